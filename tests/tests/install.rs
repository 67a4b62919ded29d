//! The install path's files: the cloud-config rendered from `systemd/cloud-init/user-data.yaml` is valid YAML whose
//! files are exactly the shipped configuration and unit (and the given TLS files), and whose commands fetch the
//! binary by the given URL and checksum (parsed with PyYAML, as cloud-init itself parses it), only on a supported
//! guest (x86_64, glibc >= 2.17); the renderer and the private apt configuration of scripts/lib/apt.sh say what is
//! wrong in a sentence.

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
         assert files['/etc/wukong-agent/wukong-agent.service'] == open({unit:?}).read(), 'unit, staged'\n\
         assert not any(p.startswith('/etc/systemd/') for p in files), 'no unit before the guest is checked'\n\
         assert files['/etc/wukong-agent/tls/agent.crt'] == 'CERT\\nline 2\\n', 'cert'\n\
         assert files['/etc/wukong-agent/tls/agent.key'] == 'KEY\\n', 'key'\n\
         assert len(d['runcmd']) == 1 and d['runcmd'][0][:2] == ['sh', '-ec'], d['runcmd']\n\
         cmd = d['runcmd'][0][2]\n\
         assert 'http://10.0.2.2:8000/wukong-agent' in cmd and {sha:?} in cmd, cmd\n\
         assert cmd.rstrip().endswith('systemctl enable --now wukong-agent.service'), cmd\n\
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

/// The install script of the rendered user data, run with stand-ins for `uname`, `getconf`, `ldd` and every command
/// that would change the guest (they only log their arguments): a supported guest gets the binary, the unit and
/// `systemctl enable`, in that order; an aarch64 guest, an old glibc or a musl guest is refused with one sentence
/// on stderr (cloud-init's log) and nothing is downloaded, installed or enabled.
#[test]
fn install_script_checks_the_guest_before_it_installs_anything() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    for (name, text) in [("a.crt", "CERT\n"), ("a.key", "KEY\n"), ("ca.crt", "CA\n")] {
        std::fs::write(path(name), text)?;
    }
    let sha = "cd".repeat(32);
    let (code, rendered, stderr) = render(&[
        "--agent-url",
        "http://10.0.2.2:8000/wukong-agent",
        "--agent-sha256",
        &sha,
        "--cert",
        &path("a.crt"),
        "--key",
        &path("a.key"),
        "--client-ca",
        &path("ca.crt"),
    ])?;
    assert_eq!(code, Some(0), "{stderr}");
    std::fs::write(path("user-data"), rendered)?;
    let extract =
        format!("import yaml\nprint(yaml.safe_load(open({:?}))['runcmd'][0][2], end='')\n", path("user-data"));
    let py = Command::new("python3").arg("-c").arg(&extract).output().context("python3 with PyYAML")?;
    assert!(py.status.success(), "{}", String::from_utf8_lossy(&py.stderr));
    let script = String::from_utf8(py.stdout)?;

    let fake = dir.path().join("bin");
    std::fs::create_dir_all(&fake)?;
    let stubs = [
        ("uname", "echo \"$FAKE_ARCH\""),
        ("getconf", "[ -n \"$FAKE_GETCONF\" ] || exit 1; echo \"glibc $FAKE_GETCONF\""),
        (
            "ldd",
            "[ -n \"$FAKE_LDD\" ] || { echo 'musl libc (x86_64)' >&2; exit 1; }; echo \"ldd (GNU libc) $FAKE_LDD\"",
        ),
        ("ldconfig", "printf '\\tlibudev.so.1 (libc6,x86-64) => /lib/x86_64-linux-gnu/libudev.so.1\\n'"),
    ];
    for (name, body) in stubs {
        std::fs::write(fake.join(name), format!("#!/bin/sh\n{body}\n"))?;
    }
    for name in ["curl", "sha256sum", "install", "rm", "systemctl"] {
        std::fs::write(
            fake.join(name),
            format!("#!/bin/sh\ncat >/dev/null 2>&1 <&0 || true\necho \"{name} $*\" >>\"$FAKE_LOG\"\n"),
        )?;
    }
    Command::new("chmod").arg("-R").arg("+x").arg(&fake).status()?;
    let run = |arch: &str, getconf: &str, ldd: &str| -> Result<(Option<i32>, String, String)> {
        let log = dir.path().join("log");
        let _ = std::fs::remove_file(&log);
        let out = Command::new("sh")
            .args(["-ec", &script])
            .env("PATH", format!("{}:/usr/bin:/bin", fake.display()))
            .env("FAKE_ARCH", arch)
            .env("FAKE_GETCONF", getconf)
            .env("FAKE_LDD", ldd)
            .env("FAKE_LOG", &log)
            .stdin(std::process::Stdio::null())
            .output()?;
        Ok((out.status.code(), std::fs::read_to_string(&log).unwrap_or_default(), String::from_utf8(out.stderr)?))
    };

    for (arch, getconf, ldd) in
        [("x86_64", "2.36", ""), ("x86_64", "2.17", ""), ("x86_64", "", "2.28"), ("x86_64", "3.0", "")]
    {
        let (code, log, stderr) = run(arch, getconf, ldd)?;
        assert_eq!(code, Some(0), "{arch} {getconf} {ldd}: {stderr}");
        let steps: Vec<&str> = log.lines().collect();
        assert_eq!(
            steps,
            [
                "curl -fsSL --retry 5 -o /usr/local/bin/.wukong-agent http://10.0.2.2:8000/wukong-agent",
                "sha256sum -c -",
                "install -m 0755 /usr/local/bin/.wukong-agent /usr/local/bin/wukong-agent",
                "rm -f /usr/local/bin/.wukong-agent",
                "install -m 0644 /etc/wukong-agent/wukong-agent.service /etc/systemd/system/wukong-agent.service",
                "systemctl daemon-reload",
                "systemctl enable --now wukong-agent.service",
            ],
            "{arch} {getconf} {ldd}"
        );
    }
    for (arch, getconf, ldd, said) in [
        (
            "aarch64",
            "2.36",
            "",
            "wukong-agent: not installed: this guest is aarch64; wukong-agent is built for x86_64 only",
        ),
        (
            "x86_64",
            "2.12",
            "",
            "wukong-agent: not installed: this guest has glibc 2.12; wukong-agent needs glibc 2.17 or newer",
        ),
        (
            "x86_64",
            "",
            "2.9",
            "wukong-agent: not installed: this guest has glibc 2.9; wukong-agent needs glibc 2.17 or newer",
        ),
        (
            "x86_64",
            "",
            "",
            "wukong-agent: not installed: no GNU libc found (getconf GNU_LIBC_VERSION, ldd --version); \
             wukong-agent needs glibc 2.17 or newer",
        ),
    ] {
        let (code, log, stderr) = run(arch, getconf, ldd)?;
        assert_eq!(code, Some(1), "{arch} {getconf} {ldd}");
        assert_eq!(stderr.trim(), said, "{arch} {getconf} {ldd}");
        assert!(log.is_empty(), "{arch} {getconf} {ldd}: nothing is fetched, installed or enabled: {log}");
    }
    Ok(())
}

/// Runs the renderer with `args`; returns its exit code, stdout and stderr.
fn render(args: &[&str]) -> Result<(Option<i32>, String, String)> {
    let out = Command::new("bash").arg(workspace_root().join("scripts/render-user-data.sh")).args(args).output()?;
    Ok((out.status.code(), String::from_utf8(out.stdout)?, String::from_utf8(out.stderr)?))
}

#[test]
fn render_user_data_names_its_real_flags_and_explains_itself() -> Result<()> {
    let (code, usage, _) = render(&["--help"])?;
    assert_eq!(code, Some(0));
    for flag in ["--agent-url", "--agent-sha256", "--cert", "--key", "--client-ca", "--config", "userDataSecretRef"] {
        assert!(usage.contains(flag), "--help mentions {flag}:\n{usage}");
    }
    let sha = "ab".repeat(32);
    for (args, said) in [
        (vec![], "render-user-data: --agent-url, --agent-sha256, --cert, --key and --client-ca are required"),
        (
            vec!["--agent-url", "http://x", "--agent-sha256", &sha, "--cert", "a", "--key", "b"],
            "--client-ca is required",
        ),
        (vec!["--agent-sha256", &sha, "--cert", "a", "--key", "b", "--client-ca", "c"], "--agent-url is required"),
        (vec!["--agent-url", "http://x", "--cert"], "render-user-data: --cert needs a value"),
        (vec!["--key", "--cert", "a.crt"], "render-user-data: --key needs a value"),
        (vec!["--client-ca"], "render-user-data: --client-ca needs a value"),
        (vec!["--url", "http://x"], "render-user-data: unknown argument --url"),
    ] {
        let (code, stdout, stderr) = render(&args)?;
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(stdout.is_empty(), "{args:?}: nothing rendered");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: one sentence: {stderr}");
        assert!(stderr.contains(said), "{args:?}: expected {said:?}, got {stderr:?}");
        assert!(!stderr.contains("unbound variable"), "{args:?}: {stderr}");
    }
    Ok(())
}

/// KubeVirt's cloudInitNoCloud takes a Secret as userDataSecretRef (or networkDataSecretRef); it has no
/// `secretRef`, and a VM spec copied from a comment that says so is refused.
#[test]
fn the_install_files_name_kubevirts_secret_fields() -> Result<()> {
    let root = workspace_root();
    for file in ["systemd/cloud-init/user-data.yaml", "scripts/render-user-data.sh"] {
        let text = std::fs::read_to_string(root.join(file))?;
        assert!(text.contains("userDataSecretRef"), "{file}");
        assert!(!text.contains("secretRef"), "{file} names a field KubeVirt does not have");
    }
    Ok(())
}

/// Runs `apt_private_setup` from scripts/lib/apt.sh against a fixture `/etc/apt`, writing to `out_dir`; returns
/// whether it succeeded, its stderr, and the private sources directory's files with their content.
fn apt_setup(
    etc: &std::path::Path,
    out_dir: &std::path::Path,
) -> Result<(bool, String, std::collections::BTreeMap<String, String>)> {
    let script = format!(". {:?} && apt_private_setup", workspace_root().join("scripts/lib/apt.sh"));
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .env("WUKONG_APT_ETC", etc)
        .env("WUKONG_APT_DIR", out_dir)
        .output()?;
    let mut files = std::collections::BTreeMap::new();
    if let Ok(entries) = std::fs::read_dir(out_dir.join("sources")) {
        for entry in entries {
            let path = entry?.path();
            files.insert(path.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read_to_string(&path)?);
        }
    }
    Ok((out.status.success(), String::from_utf8(out.stderr)?, files))
}

fn backports_uri(files: &std::collections::BTreeMap<String, String>) -> &str {
    let text = files.get("backports.sources").expect("backports.sources is written");
    assert!(text.contains("Suites: bookworm-backports\n"), "{text}");
    text.lines().find_map(|l| l.strip_prefix("URIs: ")).expect("a URIs line")
}

#[test]
fn private_apt_sources_are_copied_from_either_format_with_a_mirror_for_backports() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let write = |rel: &str, text: &str| -> Result<()> {
        let path = dir.path().join(rel);
        std::fs::create_dir_all(path.parent().unwrap())?;
        Ok(std::fs::write(path, text)?)
    };
    let deb822 = "Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\n\
                  Components: main\n\n# the mirror\nTypes: deb deb-src\nURIs: http://mirror.example/debian\n\
                  Suites: bookworm bookworm-updates\nComponents: main\n";
    let classic = "# deb cdrom:[Debian GNU/Linux 12 _Bookworm_]/ bookworm main\n\
                   deb http://security.example/debian-security bookworm-security main\n\
                   deb-src http://source.example/debian bookworm main\n\
                   deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://classic.example/debian bookworm main\n";
    write("deb822/sources.list.d/debian.sources", deb822)?;
    write("classic/sources.list", classic)?;
    write("both/sources.list.d/debian.sources", deb822)?;
    write("both/sources.list", classic)?;
    write("both/sources.list.d/extra.list", "deb http://extra.example/debian bookworm main\n")?;
    write("none/sources.list", "# deb http://commented.example/debian bookworm main\n")?;
    write("none/sources.list.d/security.sources", "Types: deb\nURIs: http://security.example/debian-security\n")?;

    let run = |tree: &str| apt_setup(&dir.path().join(tree), &dir.path().join(format!("{tree}.out")));
    let (ok, stderr, files) = run("deb822")?;
    assert!(ok, "{stderr}");
    assert_eq!(backports_uri(&files), "http://mirror.example/debian", "the security archive is skipped");
    assert_eq!(files.get("debian.sources").map(String::as_str), Some(deb822), "the machine's own file, copied");

    let (ok, stderr, files) = run("classic")?;
    assert!(ok, "{stderr}");
    assert_eq!(backports_uri(&files), "http://classic.example/debian", "options, deb-src and comments skipped");
    assert_eq!(files.get("etc-sources.list").map(String::as_str), Some(classic), "sources.list, copied as a .list");

    let (ok, stderr, files) = run("both")?;
    assert!(ok, "{stderr}");
    assert_eq!(backports_uri(&files), "http://mirror.example/debian");
    let names: Vec<&str> = files.keys().map(String::as_str).collect();
    assert_eq!(names, ["backports.sources", "debian.sources", "etc-sources.list", "extra.list"]);

    // The same private directory set up again from the classic tree keeps nothing of the first setup.
    let (ok, stderr, files) = apt_setup(&dir.path().join("classic"), &dir.path().join("both.out"))?;
    assert!(ok, "{stderr}");
    let names: Vec<&str> = files.keys().map(String::as_str).collect();
    assert_eq!(names, ["backports.sources", "etc-sources.list"]);
    assert_eq!(backports_uri(&files), "http://classic.example/debian");

    let (ok, stderr, files) = run("none")?;
    assert!(!ok, "no mirror is an error");
    assert_eq!(
        stderr.trim(),
        format!(
            "apt: no Debian mirror found in {0}/sources.list, {0}/sources.list.d/*.list or {0}/sources.list.d/*.sources; \
             add the machine's mirror there (or point WUKONG_APT_ETC at a directory that has one)",
            dir.path().join("none").display()
        )
    );
    assert!(files.is_empty(), "nothing was written: {files:?}");
    Ok(())
}
