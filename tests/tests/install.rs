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
         assert files['/etc/wukong-agent/wukong-agent.tmpfiles'] == open({tmpfiles:?}).read(), 'tmpfiles, staged'\n\
         assert not any(p.startswith('/etc/systemd/') for p in files), 'no unit before the guest is checked'\n\
         assert files['/etc/wukong-agent/tls/agent.crt'] == 'CERT\\nline 2\\n', 'cert'\n\
         assert files['/etc/wukong-agent/tls/agent.key'] == 'KEY\\n', 'key'\n\
         assert len(d['runcmd']) == 1 and d['runcmd'][0][:2] == ['sh', '-ec'], d['runcmd']\n\
         cmd = d['runcmd'][0][2]\n\
         assert cmd.startswith(\"kind=binary\\nurl='http://10.0.2.2:8000/wukong-agent'\\nsha={sha}\\n\"), cmd\n\
         print('ok')\n",
        config = root.join("systemd/agent.toml"),
        unit = root.join("systemd/wukong-agent.service"),
        tmpfiles = root.join("systemd/wukong-agent.tmpfiles"),
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

/// A stand-in guest for the rendered install script: `uname`, `getconf`, `ldd` and `ldconfig` answer as the
/// environment says (FAKE_ARCH, FAKE_GETCONF, FAKE_LDD), every command that would change the guest only logs its
/// arguments (FAKE_LOG; curl also writes the URL it got, byte for byte, to FAKE_URL), and nothing else is on PATH
/// but sed, grep and cat. `with_package_tools: false` is a guest without dpkg and rpm.
struct FakeGuest {
    dir: tempfile::TempDir,
    script: String,
}

impl FakeGuest {
    /// Renders the user data with `args` (and throwaway TLS files) and extracts its install script with PyYAML, as
    /// cloud-init parses it.
    fn render(args: &[&str], with_package_tools: bool) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let path = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
        for (name, text) in [("a.crt", "CERT\n"), ("a.key", "KEY\n"), ("ca.crt", "CA\n")] {
            std::fs::write(path(name), text)?;
        }
        let mut all: Vec<&str> = args.to_vec();
        let files = [path("a.crt"), path("a.key"), path("ca.crt")];
        all.extend(["--cert", &files[0], "--key", &files[1], "--client-ca", &files[2]]);
        let (code, rendered, stderr) = render(&all)?;
        assert_eq!(code, Some(0), "{args:?}: {stderr}");
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
        let mut changers = vec!["curl", "sha256sum", "install", "rm", "systemctl", "systemd-tmpfiles"];
        if with_package_tools {
            changers.extend(["dpkg", "rpm"]);
        }
        for name in changers {
            std::fs::write(
                fake.join(name),
                format!(
                    "#!/bin/sh\ncat >/dev/null 2>&1 <&0 || true\necho \"{name} $*\" >>\"$FAKE_LOG\"\n\
                     if [ {name} = curl ]; then for a; do last=$a; done; printf %s \"$last\" >\"$FAKE_URL\"; fi\n"
                ),
            )?;
        }
        for tool in ["sed", "grep", "cat"] {
            std::os::unix::fs::symlink(format!("/bin/{tool}"), fake.join(tool))?;
        }
        Command::new("chmod").arg("-R").arg("+x").arg(&fake).status()?;
        Ok(Self { dir, script })
    }

    /// Runs the script on a guest with this machine name and glibc; returns its exit code, the log of what it
    /// changed, its stderr and the URL curl got (empty when it did not run).
    fn run(&self, arch: &str, getconf: &str, ldd: &str) -> Result<(Option<i32>, String, String, Vec<u8>)> {
        let (log, url) = (self.dir.path().join("log"), self.dir.path().join("url"));
        let _ = std::fs::remove_file(&log);
        let _ = std::fs::remove_file(&url);
        let out = Command::new("/bin/sh")
            .args(["-ec", &self.script])
            .env_clear()
            .env("PATH", self.dir.path().join("bin"))
            .env("FAKE_ARCH", arch)
            .env("FAKE_GETCONF", getconf)
            .env("FAKE_LDD", ldd)
            .env("FAKE_LOG", &log)
            .env("FAKE_URL", &url)
            .stdin(std::process::Stdio::null())
            .output()?;
        Ok((
            out.status.code(),
            std::fs::read_to_string(&log).unwrap_or_default(),
            String::from_utf8(out.stderr)?,
            std::fs::read(&url).unwrap_or_default(),
        ))
    }
}

/// The install script of the rendered user data, on stand-in guests: a supported guest gets the binary, the
/// tmpfiles.d entry, the unit and `systemctl enable`, in that order (or the package, installed by dpkg or rpm,
/// keeping the configuration written before it); a riscv64 guest, an old glibc, a musl guest or a guest without
/// the package's tool is refused with one sentence on stderr (cloud-init's log) and nothing is downloaded,
/// installed or enabled.
#[test]
fn install_script_checks_the_guest_before_it_installs_anything() -> Result<()> {
    let sha = "cd".repeat(32);
    let url = "http://10.0.2.2:8000/wukong-agent";
    let binary = FakeGuest::render(&["--agent-url", url, "--agent-sha256", &sha], true)?;
    for (arch, getconf, ldd) in [
        ("x86_64", "2.36", ""),
        ("x86_64", "2.17", ""),
        ("x86_64", "", "2.28"),
        ("x86_64", "3.0", ""),
        ("aarch64", "2.36", ""),
    ] {
        let (code, log, stderr, _) = binary.run(arch, getconf, ldd)?;
        assert_eq!(code, Some(0), "{arch} {getconf} {ldd}: {stderr}");
        let steps: Vec<&str> = log.lines().collect();
        assert_eq!(
            steps,
            [
                "curl -fsSL --retry 5 -o /usr/sbin/.wukong-agent http://10.0.2.2:8000/wukong-agent",
                "sha256sum -c -",
                "install -m 0755 /usr/sbin/.wukong-agent /usr/sbin/wukong-agent",
                "rm -f /usr/sbin/.wukong-agent",
                "install -m 0644 /etc/wukong-agent/wukong-agent.tmpfiles /etc/tmpfiles.d/wukong-agent.conf",
                "systemd-tmpfiles --create wukong-agent.conf",
                "install -m 0644 /etc/wukong-agent/wukong-agent.service /etc/systemd/system/wukong-agent.service",
                "systemctl daemon-reload",
                "systemctl enable --now wukong-agent.service",
            ],
            "{arch} {getconf} {ldd}"
        );
    }
    for (flag, kind, install) in [
        ("--agent-deb", "deb", "dpkg --force-confold -i /var/tmp/wukong-agent.deb"),
        ("--agent-rpm", "rpm", "rpm -U /var/tmp/wukong-agent.rpm"),
    ] {
        let package = FakeGuest::render(&[flag, url, "--agent-sha256", &sha], true)?;
        let (code, log, stderr, _) = package.run("x86_64", "2.28", "")?;
        assert_eq!(code, Some(0), "{flag}: {stderr}");
        let steps: Vec<&str> = log.lines().collect();
        let rm = format!(
            "rm -f /var/tmp/wukong-agent.{kind} /etc/wukong-agent/wukong-agent.service \
             /etc/wukong-agent/wukong-agent.tmpfiles"
        );
        assert_eq!(
            steps,
            [&format!("curl -fsSL --retry 5 -o /var/tmp/wukong-agent.{kind} {url}"), "sha256sum -c -", install, &rm],
            "{flag}: the package's own scripts enable and start the unit"
        );
        let (code, log, stderr, _) =
            FakeGuest::render(&[flag, url, "--agent-sha256", &sha], false)?.run("x86_64", "2.28", "")?;
        assert_eq!(code, Some(1), "{flag} on a guest without its tool");
        let tool = if kind == "deb" { "dpkg" } else { "rpm" };
        assert_eq!(
            stderr.trim(),
            format!(
                "wukong-agent: not installed: this guest has no {tool}; render the user data for the package \
                 format it has"
            ),
            "{flag}"
        );
        assert!(log.is_empty(), "{flag}: nothing is fetched without {tool}: {log}");
    }
    for (arch, getconf, ldd, said) in [
        (
            "riscv64",
            "2.36",
            "",
            "wukong-agent: not installed: this guest is riscv64; wukong-agent is built for x86_64 and aarch64",
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
        let (code, log, stderr, _) = binary.run(arch, getconf, ldd)?;
        assert_eq!(code, Some(1), "{arch} {getconf} {ldd}");
        assert_eq!(stderr.trim(), said, "{arch} {getconf} {ldd}");
        assert!(log.is_empty(), "{arch} {getconf} {ldd}: nothing is fetched, installed or enabled: {log}");
    }
    Ok(())
}

/// Any one-line URL reaches the guest's curl byte for byte, through the YAML (parsed as cloud-init parses it) and
/// the shell: a presigned URL's `&` (which awk's gsub would have replaced with the placeholder), `\`, `|`, `#`,
/// quotes of both kinds and would-be command substitutions. A line break or another control character is refused
/// by name, and nothing is rendered.
#[test]
fn render_user_data_passes_any_url_through_unchanged() -> Result<()> {
    let sha = "ef".repeat(32);
    let hostile = [
        "https://b.s3.example/wukong-agent.deb?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AK%2F20260101&X-Amz-Signature=abc",
        r"http://h/a\1\\b\&c",
        "http://h/a|b||c#frag # not a comment",
        r#"http://h/it's "quoted" 'twice''"#,
        "http://h/$(touch /tmp/pwned)`id`${HOME}$HOME",
        "http://h/@AGENT_URL@&@AGENT_SHA256@ spaces  and more",
    ];
    for (i, url) in hostile.iter().enumerate() {
        let flag = ["--agent-url", "--agent-deb", "--agent-rpm"][i % 3];
        let guest = FakeGuest::render(&[flag, url, "--agent-sha256", &sha], true)?;
        let (code, _, stderr, got) = guest.run("x86_64", "2.36", "")?;
        assert_eq!(code, Some(0), "{flag} {url:?}: {stderr}");
        assert_eq!(String::from_utf8_lossy(&got), *url, "{flag}: curl got the URL byte for byte");
        assert!(guest.script.contains(&format!("sha={sha}\n")), "{flag} {url:?}: the checksum is intact");
    }
    for (url, what) in
        [("http://h/a\nb", "a newline"), ("http://h/a\rb", "a carriage return"), ("http://h/\u{1b}[0m", "an escape")]
    {
        let (code, stdout, stderr) =
            render(&["--agent-deb", url, "--agent-sha256", &sha, "--cert", "a", "--key", "b", "--client-ca", "c"])?;
        assert_eq!(code, Some(2), "{what}");
        assert!(stdout.is_empty(), "{what}: nothing rendered");
        assert_eq!(
            stderr.trim(),
            "render-user-data: --agent-deb holds a line break or another control character; give the URL on one line",
            "{what}"
        );
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
    for flag in [
        "--agent-url",
        "--agent-deb",
        "--agent-rpm",
        "--agent-sha256",
        "--cert",
        "--key",
        "--client-ca",
        "--config",
        "userDataSecretRef",
    ] {
        assert!(usage.contains(flag), "--help mentions {flag}:\n{usage}");
    }
    let sha = "ab".repeat(32);
    for (args, said) in [
        (
            vec![],
            "render-user-data: --agent-url (or --agent-deb, --agent-rpm), --agent-sha256, --cert, --key and \
             --client-ca are required",
        ),
        (
            vec!["--agent-url", "http://x", "--agent-sha256", &sha, "--cert", "a", "--key", "b"],
            "--client-ca is required",
        ),
        (
            vec!["--agent-sha256", &sha, "--cert", "a", "--key", "b", "--client-ca", "c"],
            "--agent-url (or --agent-deb, --agent-rpm) is required",
        ),
        (
            vec!["--agent-deb", "http://x", "--agent-rpm", "http://y"],
            "render-user-data: give one of --agent-url, --agent-deb and --agent-rpm, not --agent-deb and --agent-rpm",
        ),
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
