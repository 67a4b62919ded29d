//! The agent's packages as `scripts/package-agent.sh` builds them, read back with the package tools: the .deb's
//! control fields, conffiles, maintainer scripts and files (`dpkg-deb -f/-e/-c`), the .rpm's files, conffile flags
//! and scriptlets (`rpm -qp`), both carrying the very binary the guest lab runs and the workspace's version, and
//! identical bytes from a second build. What the scripts do in a guest is `systemd_guest`'s part.

use anyhow::{Context, Result, ensure};
use std::path::Path;
use std::process::Command;
use wukong_e2e::{agent_binary, agent_packages, workspace_root};

fn output(program: &str, args: &[&str], path: &Path) -> Result<String> {
    let mut command = Command::new(program);
    // Debian's rpm opens a database in ~/.rpmdb even to read a package file: a throwaway one, nothing in HOME.
    let rpmdb = tempfile::tempdir()?;
    if program == "rpm" {
        command.arg("--dbpath").arg(rpmdb.path());
    }
    let out = command.args(args).arg(path).output().with_context(|| program.to_string())?;
    ensure!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8(out.stdout)?)
}

#[test]
fn the_packages_carry_the_agent_its_unit_and_a_kept_configuration() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let version = env!("CARGO_PKG_VERSION");
    let (deb, rpm) = agent_packages(dir.path(), version)?;
    let root = workspace_root();
    let binary = std::fs::read(agent_binary())?;

    // .deb: control fields, the conffile, the maintainer scripts as written in packaging/deb, the files.
    let field = |name: &str| -> Result<String> {
        let out = Command::new("dpkg-deb").arg("-f").arg(&deb).arg(name).output()?;
        ensure!(out.status.success(), "dpkg-deb -f {name}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8(out.stdout)?.trim().to_string())
    };
    assert_eq!(field("Package")?, "wukong-agent");
    assert_eq!(field("Version")?, version, "the workspace's version");
    assert_eq!(field("Architecture")?, "amd64");
    assert_eq!(field("Depends")?, "libc6 (>= 2.17), libudev1, init-system-helpers (>= 1.52)");
    let control = dir.path().join("control");
    let out = Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control).status()?;
    ensure!(out.success(), "dpkg-deb -e");
    assert_eq!(std::fs::read_to_string(control.join("conffiles"))?, "/etc/wukong-agent/agent.toml\n");
    for script in ["postinst", "prerm", "postrm"] {
        assert_eq!(
            std::fs::read(control.join(script))?,
            std::fs::read(root.join("packaging/deb").join(script))?,
            "{script} as written in packaging/deb"
        );
    }
    let postinst = std::fs::read_to_string(control.join("postinst"))?;
    assert!(postinst.contains("deb-systemd-helper enable wukong-agent.service"), "a new install enables");
    assert!(postinst.contains("action=restart") && postinst.contains("action=start"), "starts, restarts on upgrade");
    let prerm = std::fs::read_to_string(control.join("prerm"))?;
    assert!(prerm.contains("[ \"$1\" = remove ]") && prerm.contains("deb-systemd-invoke stop"), "{prerm}");
    let postrm = std::fs::read_to_string(control.join("postrm"))?;
    assert!(postrm.contains("kept /run/wukong-agent: its release journal holds a release"), "{postrm}");
    let listing = output("dpkg-deb", &["-c"], &deb)?;
    let files: Vec<(String, String)> = listing
        .lines()
        .filter(|l| !l.ends_with('/'))
        .map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            (words[words.len() - 1].trim_start_matches('.').to_string(), format!("{} {}", words[0], words[1]))
        })
        .collect();
    let expected = [
        ("/etc/wukong-agent/agent.toml", "-rw------- root/root"),
        ("/lib/systemd/system/wukong-agent.service", "-rw-r--r-- root/root"),
        ("/usr/lib/tmpfiles.d/wukong-agent.conf", "-rw-r--r-- root/root"),
        ("/usr/sbin/wukong-agent", "-rwxr-xr-x root/root"),
        ("/usr/share/doc/wukong-agent/changelog.gz", "-rw-r--r-- root/root"),
        ("/usr/share/doc/wukong-agent/copyright", "-rw-r--r-- root/root"),
        ("/usr/share/lintian/overrides/wukong-agent", "-rw-r--r-- root/root"),
    ];
    let expected: Vec<(String, String)> = expected.iter().map(|(p, m)| (p.to_string(), m.to_string())).collect();
    assert_eq!(files, expected, "{listing}");
    assert!(
        listing.contains("drwx------ root/root         0") && listing.contains("./etc/wukong-agent/\n"),
        "{listing}"
    );
    let extract = |path: &str| -> Result<Vec<u8>> {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("dpkg-deb --fsys-tarfile \"$0\" | tar -xO .{path}"))
            .arg(&deb)
            .output()?;
        ensure!(out.status.success(), "{path}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(out.stdout)
    };
    assert!(extract("/usr/sbin/wukong-agent")? == binary, "the .deb carries the glibc 2.17 build");
    assert_eq!(
        extract("/lib/systemd/system/wukong-agent.service")?,
        std::fs::read(root.join("systemd/wukong-agent.service"))?
    );
    assert_eq!(extract("/etc/wukong-agent/agent.toml")?, std::fs::read(root.join("systemd/agent.toml"))?);
    assert_eq!(
        extract("/usr/lib/tmpfiles.d/wukong-agent.conf")?,
        std::fs::read(root.join("systemd/wukong-agent.tmpfiles"))?
    );

    // .rpm: name and version, the files with their modes and flags (c = %config, n = noreplace), the scriptlets.
    let nvr = output("rpm", &["-qp", "--qf", "%{NAME} %{VERSION} %{RELEASE} %{ARCH}"], &rpm)?;
    assert_eq!(nvr, format!("wukong-agent {version} 1 x86_64"));
    let list = output("rpm", &["-qp", "--list"], &rpm)?;
    assert_eq!(
        list.lines().collect::<Vec<_>>(),
        [
            "/etc/wukong-agent",
            "/etc/wukong-agent/agent.toml",
            "/usr/lib/systemd/system/wukong-agent.service",
            "/usr/lib/tmpfiles.d/wukong-agent.conf",
            "/usr/sbin/wukong-agent",
            "/usr/share/doc/wukong-agent/README.md",
            "/usr/share/licenses/wukong-agent/LICENSE",
        ]
    );
    assert_eq!(output("rpm", &["-qp", "--configfiles"], &rpm)?, "/etc/wukong-agent/agent.toml\n");
    let flags = output("rpm", &["-qp", "--qf", "[%{FILENAMES} %{FILEMODES:perms} %{FILEFLAGS:fflags}\n]"], &rpm)?;
    for line in [
        "/etc/wukong-agent drwx------ ",
        "/etc/wukong-agent/agent.toml -rw------- cn",
        "/usr/sbin/wukong-agent -rwxr-xr-x ",
        "/usr/lib/systemd/system/wukong-agent.service -rw-r--r-- ",
    ] {
        assert!(flags.lines().any(|l| l == line.trim_end() || l == line), "{line:?} not in:\n{flags}");
    }
    let scripts = output("rpm", &["-qp", "--scripts"], &rpm)?;
    for expected in [
        "postinstall scriptlet (using /bin/sh):",
        "systemd-tmpfiles --create wukong-agent.conf",
        "systemctl --no-reload enable wukong-agent.service",
        "systemctl start wukong-agent.service",
        "preuninstall scriptlet (using /bin/sh):",
        "systemctl --no-reload disable --now wukong-agent.service",
        "postuninstall scriptlet (using /bin/sh):",
        "systemctl try-restart wukong-agent.service",
        "kept /run/wukong-agent: its release journal holds a release",
    ] {
        assert!(scripts.contains(expected), "{expected:?} not in:\n{scripts}");
    }
    // --dump: path size mtime digest (SHA-256, as package-agent.sh asks) ...
    let dump = output("rpm", &["-qp", "--dump"], &rpm)?;
    let digest =
        dump.lines().find_map(|l| l.strip_prefix("/usr/sbin/wukong-agent ")).context("the binary in --dump")?;
    let sum = Command::new("sha256sum").arg(agent_binary()).output()?;
    let sum = String::from_utf8(sum.stdout)?.split_whitespace().next().context("sha256sum")?.to_string();
    assert_eq!(digest.split_whitespace().nth(2), Some(sum.as_str()), "the .rpm carries the glibc 2.17 build: {digest}");
    // Reproducible: a second build is byte for byte the first.
    let again = tempfile::tempdir()?;
    let (deb2, rpm2) = agent_packages(again.path(), version)?;
    assert!(std::fs::read(&deb)? == std::fs::read(&deb2)?, "the .deb is reproducible");
    assert!(std::fs::read(&rpm)? == std::fs::read(&rpm2)?, "the .rpm is reproducible");
    Ok(())
}

/// Bad input is refused with a sentence, before anything is built.
#[test]
fn package_agent_refuses_a_bad_version_or_a_missing_binary() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let script = workspace_root().join("scripts/package-agent.sh");
    for (args, said) in [
        (vec!["--version", "1.0"], "package-agent: version '1.0' is not MAJOR.MINOR.PATCH"),
        (
            vec!["--binary", "/nonexistent/wukong-agent"],
            "package-agent: no agent binary at /nonexistent/wukong-agent; run scripts/lib/build-guest-agent.sh first",
        ),
    ] {
        let out = Command::new("bash").arg(&script).args(&args).arg("--out").arg(dir.path()).output()?;
        assert!(!out.status.success(), "{args:?}");
        assert_eq!(String::from_utf8(out.stderr)?.trim(), said, "{args:?}");
    }
    assert_eq!(std::fs::read_dir(dir.path())?.count(), 0, "nothing written");
    Ok(())
}
