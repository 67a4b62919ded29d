//! The install path's files: the cloud-config rendered from `systemd/cloud-init/user-data.yaml` is valid YAML whose
//! files are exactly the shipped configuration and unit (and the given TLS files), and whose commands fetch the
//! binary by the given URL and checksum. Parsed with PyYAML, as cloud-init itself parses it.

use anyhow::{Context, Result};
use std::process::Command;
use wukong_e2e::workspace_root;

#[test]
fn rendered_user_data_carries_the_shipped_files_verbatim() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = |name: &str, text: &str| -> Result<String> {
        let path = dir.path().join(name);
        std::fs::write(&path, text)?;
        Ok(path.to_string_lossy().into_owned())
    };
    let (cert, key, ca) = (file("a.crt", "CERT\nline 2\n")?, file("a.key", "KEY\n")?, file("ca.crt", "CA\n")?);
    let sha = "ab".repeat(32);
    let root = workspace_root();
    let out = Command::new("bash")
        .arg(root.join("scripts/render-user-data.sh"))
        .args(["--agent-url", "http://10.0.2.2:8000/wukong-agent", "--agent-sha256", &sha])
        .args(["--cert", &cert, "--key", &key, "--client-ca", &ca])
        .output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rendered = file("user-data", &String::from_utf8(out.stdout)?)?;
    let check = format!(
        "import yaml, sys\n\
         d = yaml.safe_load(open({rendered:?}))\n\
         files = {{f['path']: f['content'] for f in d['write_files']}}\n\
         assert files['/etc/wukong-agent/agent.toml'] == open({config:?}).read(), 'config'\n\
         assert files['/etc/systemd/system/wukong-agent.service'] == open({unit:?}).read(), 'unit'\n\
         assert files['/etc/wukong-agent/tls/agent.crt'] == 'CERT\\nline 2\\n', 'cert'\n\
         assert files['/etc/wukong-agent/tls/agent.key'] == 'KEY\\n', 'key'\n\
         cmd = d['runcmd'][0][2]\n\
         assert 'http://10.0.2.2:8000/wukong-agent' in cmd and {sha:?} in cmd, cmd\n\
         assert d['runcmd'][-1] == ['systemctl', 'enable', '--now', 'wukong-agent.service']\n\
         print('ok')\n",
        config = root.join("systemd/agent.toml"),
        unit = root.join("systemd/wukong-agent.service"),
    );
    let py = Command::new("python3").arg("-c").arg(&check).output().context("python3 with PyYAML")?;
    assert!(py.status.success(), "{}{}", String::from_utf8_lossy(&py.stdout), String::from_utf8_lossy(&py.stderr));

    let bad = Command::new("bash")
        .arg(root.join("scripts/render-user-data.sh"))
        .args([
            "--agent-url",
            "http://x",
            "--agent-sha256",
            "nothex",
            "--cert",
            &cert,
            "--key",
            &key,
            "--client-ca",
            &ca,
        ])
        .output()?;
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--agent-sha256 must be 64 hex digits"));
    Ok(())
}
