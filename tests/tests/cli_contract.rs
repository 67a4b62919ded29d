//! wukongctl's contract with the scripts and people that use it, over the real binaries (wukongctl, wukong-agent,
//! and the lab's KubeVirt in a real API server, without a guest): `--vmi` leads every command to the VMI's agent and never to another
//! one; every documented exit code; usage mistakes found before anything is contacted; TLS mistakes named as such;
//! JSON on every command; one error line; help that shows the flags that apply.

use anyhow::{Context, Result};
use kube::api::{Api, DynamicObject, PostParams};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use wukong_controller_client::kubevirt::vmi_resource;
use wukong_e2e::cluster::{ADMIN, Cluster};
use wukong_e2e::kubevirt_lab::{API_SERVER, CONTROLLER, HANDLER, HotplugMode, KubeVirtLab};
use wukong_e2e::pki::Pki;
use wukong_e2e::ports::free_address;
use wukong_e2e::{HostAgent, wukongctl_binary};

/// Runs wukongctl with only the environment given (none of the caller's WUKONG_* or KUBECONFIG).
fn ctl(env: &[(&str, &str)], args: &[&str]) -> Result<Output> {
    let mut command = Command::new(wukongctl_binary());
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", "/nonexistent")
        .envs(env.iter().copied())
        .args(args)
        .stdin(Stdio::null());
    // Inside a runtime that also runs the lab's KubeVirt, waiting must not hold a worker those tasks may need.
    match tokio::runtime::Handle::try_current() {
        Ok(_) => tokio::task::block_in_place(|| command.output()),
        Err(_) => command.output(),
    }
    .context("running wukongctl")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("JSON from wukongctl ({e}): {}", text(out)))
}

#[track_caller]
fn expect(out: &Output, code: i32, says: &str) {
    assert_eq!(out.status.code(), Some(code), "expected exit {code}: {}", text(out));
    assert!(text(out).contains(says), "expected {says:?} in: {}", text(out));
}

/// A kubeconfig for an API server that is not there.
fn dead_kubeconfig(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: down\n  cluster:\n    server: http://127.0.0.1:1\n\
         users:\n- name: u\n  user:\n    token: t\ncontexts:\n- name: down\n  context:\n    cluster: down\n    \
         user: u\ncurrent-context: down\n",
    )?;
    Ok(path)
}

/// `--vmi` resolves the VMI's agent (its interface IP) for every command. A decoy agent named by WUKONG_AGENT and
/// by --agent-config, read-only so its answers differ, is never reached; with the API server down the command fails.
#[tokio::test(flavor = "multi_thread")]
async fn every_command_with_vmi_reaches_the_vmis_agent_and_no_other() -> Result<()> {
    // KubeVirt in a real API server, with no guest behind the VMI: it reports 127.0.0.77 as its address.
    let cluster = Cluster::start(&[API_SERVER, CONTROLLER, HANDLER]).await?;
    let kubevirt = KubeVirtLab::start(&cluster, None, "ns1", HotplugMode::Declarative).await?;
    let dir = tempfile::tempdir()?;
    let image = dir.path().join("pvc-a.raw");
    std::fs::File::create(&image)?.set_len(1 << 20)?;
    kubevirt.create_claim("pvc-a", &image).await?;
    kubevirt.create_vm("vm1", true, "127.0.0.77").await?;
    let _vmi_agent = HostAgent::start("127.0.0.77:7443", &[])?;
    let decoy_address = free_address()?;
    let _decoy = HostAgent::start(&decoy_address, &["--read-only"])?;
    let agent_config = dir.path().join("agent.toml");
    std::fs::write(&agent_config, format!("agent = \"http://{decoy_address}\"\n"))?;
    let kubeconfig = cluster.kubeconfig(ADMIN)?.to_str().unwrap().to_string();
    let decoy_url = format!("http://{decoy_address}");
    let env = [
        ("KUBECONFIG", kubeconfig.as_str()),
        ("WUKONG_AGENT", decoy_url.as_str()),
        ("WUKONG_AGENT_CONFIG", agent_config.to_str().unwrap()),
    ];

    let decoy = ctl(&env, &["-o", "json", "info"])?;
    assert_eq!(json(&decoy)["read_only"], true, "without --vmi the environment's agent answers: {}", text(&decoy));
    for vmi in [&["--vmi", "ns1/vm1"][..], &["--vmi", "vm1", "-n", "ns1"], &["-n", "ns1", "--vmi", "ns1/vm1"]] {
        let info = ctl(&env, &[vmi, &["-o", "json", "info"]].concat())?;
        assert_eq!(json(&info)["read_only"], false, "{vmi:?} reached the VMI's agent: {}", text(&info));
    }
    // KubeVirt appends the guest's own interfaces (no name; here one whose address has nothing behind port 7443)
    // and may list them first: the agent is still the pod network's.
    let vmis = Api::<DynamicObject>::namespaced_with(cluster.client(ADMIN).await?, "ns1", &vmi_resource());
    let mut object = vmis.get("vm1").await?;
    let interfaces = object.data["status"]["interfaces"].as_array_mut().context("interfaces")?;
    interfaces.insert(0, serde_json::json!({"name": "", "ipAddress": "127.0.0.79", "interfaceName": "docker0"}));
    vmis.replace("vm1", &PostParams::default(), &object).await?;
    let info = ctl(&env, &["--vmi", "ns1/vm1", "-o", "json", "info"])?;
    assert_eq!(json(&info)["read_only"], false, "the pod network's agent answered: {}", text(&info));

    let vmi = ["--vmi", "ns1/vm1"];
    let disks = ctl(&env, &[&vmi[..], &["disks", "-o", "json"]].concat())?;
    assert!(json(&disks).is_array(), "{}", text(&disks));
    // The decoy would refuse a release as read-only (exit 1); the VMI's agent does not have the disk (exit 6).
    for command in [&["usage", "nosuch"][..], &["release", "nosuch", "--dry-run"], &["cancel-release", "nosuch"]] {
        let out = ctl(&env, &[&vmi[..], command].concat())?;
        expect(&out, 6, "nosuch");
    }
    let detach = ctl(&env, &[&vmi[..], &["detach", "pvc-gone"]].concat())?;
    expect(&detach, 0, "pvc-gone is not attached; nothing to do");
    let attach = ctl(&env, &[&vmi[..], &["attach", "data1", "--claim", "pvc-a", "--timeout", "3"]].concat())?;
    expect(&attach, 5, "the guest did not report a disk with serial 'data1'");
    let detach = ctl(&env, &[&vmi[..], &["detach", "data1"]].concat())?;
    expect(&detach, 6, "the guest's agent does not see disk 'data1'");
    // A move from vm1 reads the claim behind the volume from vm1, reaches vm2's own agent (the target guest has no
    // disk of that serial), then asks vm1's guest to release the disk, which it does not see: refused, nothing moved.
    kubevirt.create_vm("vm2", true, "127.0.0.78").await?;
    let _vm2_agent = HostAgent::start("127.0.0.78:7443", &[])?;
    let moved = ctl(&env, &[&vmi[..], &["-o", "json", "move", "data1", "--to-vmi", "vm2"]].concat())?;
    expect(&moved, 6, "the guest's agent does not see disk 'data1'");
    assert_eq!(json(&moved)["exit_code"], 6, "{}", text(&moved));
    let gone = ctl(&env, &[&vmi[..], &["move", "pvc-gone", "--to-vmi", "ns1/vm2"]].concat())?;
    expect(&gone, 1, "volume 'pvc-gone' is neither in");
    assert!(
        text(&gone).contains("ns1/vm1 nor, as 'pvc-gone', in") && text(&gone).contains("ns1/vm2"),
        "{}",
        text(&gone)
    );
    let vm2_volumes = vmis.get("vm2").await?.data["spec"]["volumes"].clone();
    assert!(!vm2_volumes.to_string().contains("pvc-a"), "nothing was added to vm2: {vm2_volumes}");
    let removals = cluster.audit()?.into_iter().filter(|e| e.request_uri.contains("/removevolume")).count();
    assert_eq!(removals, 0, "no removevolume for a disk the guest did not release");

    let mut watch = Command::new(wukongctl_binary())
        .env_clear()
        .envs(env)
        .args(["--vmi", "ns1/vm1", "-o", "json", "watch"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut first = String::new();
    BufReader::new(watch.stdout.take().unwrap()).read_line(&mut first)?;
    watch.kill()?;
    watch.wait()?;
    let event: serde_json::Value = serde_json::from_str(&first).with_context(|| format!("a JSON line: {first:?}"))?;
    assert!(event["kind"].is_string() && event["sequence"].is_number(), "{event}");

    // The API server is down: the command fails and names it; it never answers from another agent.
    let down = dead_kubeconfig(dir.path())?;
    let env = [("KUBECONFIG", down.to_str().unwrap()), ("WUKONG_AGENT", decoy_url.as_str())];
    let out = ctl(&env, &["--vmi", "ns1/vm1", "info"])?;
    expect(&out, 1, "the Kubernetes API at http://127.0.0.1:1");
    assert!(!text(&out).contains("version:"), "no answer from another agent: {}", text(&out));
    Ok(())
}

/// Every usage mistake is exit 2, found before anything is contacted: no agent, QMP socket or API server exists
/// here, so any attempt to reach one would fail with another code.
#[test]
fn usage_mistakes_exit_2_before_anything_is_contacted() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let nowhere = "http://127.0.0.1:9";
    let kubeconfig = dead_kubeconfig(dir.path())?;
    let env = [("KUBECONFIG", kubeconfig.to_str().unwrap()), ("WUKONG_AGENT", nowhere)];
    let long_name = "a-volume-name-of-thirty-chars";
    let cases: &[(&[&str], &str)] = &[
        (&["--vmi", "pg-0", "info"], "names no namespace; use --vmi NAMESPACE/pg-0 or -n NAMESPACE"),
        (&["--vmi", "prod/pg/0", "release", "d1"], "is not a valid VMI name"),
        (&["--vmi", "prod/pg-0", "-n", "dev", "disks"], "name different namespaces"),
        (&["attach", "vol1", "--image", "/x.raw"], "attach, detach and move need a hypervisor"),
        (&["detach", "vol1"], "attach, detach and move need a hypervisor"),
        (&["move", "vol1", "--to-vmi", "vm2"], "attach, detach and move need a hypervisor"),
        (&["move", "vol1", "--qmp", "/q"], "move needs a target: --to-vmi [NS/]NAME (KubeVirt) or --to-qmp SOCKET"),
        (&["move", "vol1", "--qmp", "/q", "--to-qmp", "/q", "--to-agent", nowhere], "is the source's QMP socket"),
        (&["move", "vol1", "--qmp", "/q", "--to-qmp", "/r"], "with --to-qmp, give --to-agent"),
        (&["move", "vol1", "--qmp", "/q", "--to-qmp", "/r", "--to-agent", "10.0.0.1:7443"], "is not an agent address"),
        (&["move", "vol1", "--qmp", "/q", "--to-vmi", "ns/vm2"], "a move stays with one kind of hypervisor"),
        (&["move", "vol1", "--qmp", "/q", "--to-qmp", "/r", "--to-agent", nowhere, "--claim", "c"], "are for KubeVirt"),
        (
            &["move", "vol1", "--qmp", "/q", "--to-qmp", "/r", "--to-agent", nowhere, "--bus", "virtio"],
            "a virtio disk over --to-qmp needs --to-virtio-bus PORT",
        ),
        (&["--vmi", "ns/vm", "move", "vol1", "--to-vmi", "other/vm2"], "a move stays in its namespace"),
        (&["--vmi", "ns/vm", "move", "vol1", "--to-vmi", "vm"], "--to-vmi vm is the source VMI ns/vm"),
        (&["--vmi", "ns/vm", "move", "vol1", "--to-vmi", "vm2", "--to-qmp", "/r"], "either --to-vmi or --to-qmp"),
        (&["--vmi", "ns/vm", "move", "vol1", "--to-vmi", "ns/Vm2"], "is not a valid VMI name"),
        (&["--vmi", "ns/vm", "move", "vol1", "--to-vmi", "vm2", "--image", "/x"], "--image is for QEMU (--qmp)"),
        (&["--vmi", "ns/vm", "move", "vol1", "--to-vmi", "vm2", "--to-volume", "Vol2"], "'Vol2' is not a volume"),
        (&["--vmi", "ns/vm", "move", "vol1", "--to-vmi", "vm2", "--serial", "Bad/S"], "only letters, digits"),
        (&["--vmi", "ns/vm", "move", "vol1", "--to-vmi", "vm2", "--force"], "a move exists to keep the data"),
        (&["attach", "vol1", "--qmp", "/nonexistent.qmp"], "with --qmp, give --image FILE"),
        (&["--vmi", "ns/vm", "attach", "vol1"], "with --vmi, give --claim PVC or --data-volume DV"),
        (&["--vmi", "ns/vm", "attach", "vol1", "--qmp", "/q"], "either --vmi (KubeVirt) or --qmp (QEMU), not both"),
        (&["detach", "vol1", "--qmp", "/q", "--persist"], "--persist is for KubeVirt"),
        (&["detach", "vol1", "--qmp", "/q", "--delete-claim"], "--delete-claim is for KubeVirt volumes"),
        (&["--vmi", "ns/vm", "attach", "Data1", "--claim", "c"], "'Data1' is not a volume name"),
        (&["--vmi", "ns/vm", "attach", "vol 1", "--claim", "c"], "'vol 1' is not a volume name"),
        (&["--vmi", "ns/vm", "attach", long_name, "--claim", "c"], "give one with --serial"),
        (&["--vmi", "ns/vm", "attach", "vol1", "--claim", "c", "--serial", "Bad/S"], "'Bad/S' is not a portable"),
        (&["usage", "bad/serial"], "only letters, digits"),
        (&["release", ""], "the serial is empty"),
        (&["--vmi", "ns/vm", "detach", "vol1", "--serial", "a b"], "only letters, digits"),
        (&["watch", "ok", "no/pe"], "only letters, digits"),
        (&["--agent", "10.0.0.1:7443", "info"], "is not an agent address"),
        (&["--agent", "vsock://3", "info"], "vsock:// needs CID:PORT"),
        (&["--agent", "hvsock://run/vm.vsock:7443", "info"], "the socket's path must be absolute"),
        (&["--agent-transport", "vsock", "info"], "--agent-transport chooses the way to the agent of a --vmi"),
        (&["--vmi", "ns/vm", "--agent", nowhere, "--agent-network", "s", "info"], "--agent-network chooses the way"),
        (&["--agent-config", "/nonexistent/agent.toml", "info"], "cannot read the agent configuration"),
        (&["--tls-ca", "/ca.crt", "info"], "mutual TLS needs all of --tls-ca, --tls-cert and --tls-key"),
        (&["--kubeconfig", "/nonexistent/kubeconfig", "--vmi", "ns/vm", "info"], "cannot use the kubeconfig"),
        (&["info", "--qmp", "/q"], "unexpected argument '--qmp'"),
        (&["--persist", "info"], "unexpected argument '--persist'"),
    ];
    for (args, says) in cases {
        let out = ctl(&env, args)?;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        assert!(text(&out).contains(says), "{args:?}: expected {says:?} in {}", text(&out));
        if !says.starts_with("unexpected argument") {
            assert_eq!(stderr(&out).lines().count(), 1, "{args:?}: one line: {}", stderr(&out));
        }
    }
    let bad_config = dir.path().join("agent.toml");
    std::fs::write(&bad_config, "agent = 7\nbogus = true\n")?;
    let out = ctl(&env, &["--agent-config", bad_config.to_str().unwrap(), "info"])?;
    expect(&out, 2, "is not a valid agent configuration");
    let out = ctl(&env, &["--kubeconfig", "/nonexistent/kubeconfig", "--vmi", "ns/vm", "info"])?;
    assert_eq!(text(&out).matches("/nonexistent/kubeconfig").count(), 1, "the path once: {}", text(&out));
    let out = ctl(&env, &["-o", "json", "usage", "bad/serial"])?;
    assert_eq!(json(&out)["exit_code"], 2, "{}", text(&out));
    Ok(())
}

/// The other exit codes, and one error line each: 0 done, 1 other, 4 agent unreachable, 6 the guest does not have
/// the disk. (3 "in use" and 5 "timeout" need a disk in use or a hypervisor: the guest-lab tests check them.)
#[test]
fn exit_codes_say_what_happened() -> Result<()> {
    let address = free_address()?;
    let _agent = HostAgent::start(&address, &[])?;
    let url = format!("http://{address}");
    let env = [("WUKONG_AGENT", url.as_str())];
    expect(&ctl(&env, &["info"])?, 0, "releases:");
    let info = ctl(&env, &["-o", "json", "info"])?;
    assert_eq!(json(&info)["read_only"], false, "{}", text(&info));
    let missing = ctl(&env, &["usage", "nosuch"])?;
    expect(&missing, 6, "nosuch");
    assert_eq!(stderr(&missing).lines().count(), 1, "{}", stderr(&missing));
    let json_missing = ctl(&env, &["-o", "json", "release", "nosuch"])?;
    assert_eq!(json(&json_missing)["exit_code"], 6);
    let down = ctl(&[("WUKONG_AGENT", "http://127.0.0.1:9")], &["info"])?;
    expect(&down, 4, "cannot reach the agent at http://127.0.0.1:9");
    assert_eq!(stderr(&down).lines().count(), 1, "no stray log lines: {}", stderr(&down));
    let no_vm = ctl(&[("WUKONG_AGENT", "hvsock:///nonexistent/vm.vsock:7443")], &["info"])?;
    expect(
        &no_vm,
        4,
        "cannot reach the agent at hvsock:///nonexistent/vm.vsock:7443: cannot connect to the Unix socket",
    );
    assert_eq!(stderr(&no_vm).lines().count(), 1, "{}", stderr(&no_vm));
    let dir = tempfile::tempdir()?;
    let kubeconfig = dead_kubeconfig(dir.path())?;
    let api_down = ctl(&[("KUBECONFIG", kubeconfig.to_str().unwrap())], &["--vmi", "ns/vm", "disks"])?;
    expect(&api_down, 1, "http://127.0.0.1:1");
    assert_eq!(stderr(&api_down).lines().count(), 1, "{}", stderr(&api_down));
    Ok(())
}

/// A host agent serving mutual TLS with the test PKI's certificate `cert` (`agent` or `named-agent`).
fn tls_agent(pki: &Pki, cert: &str) -> Result<(String, HostAgent)> {
    let p = |f: &str| pki.path(f).to_str().unwrap().to_string();
    let address = free_address()?;
    let (crt, key) = (p(&format!("{cert}.crt")), p(&format!("{cert}.key")));
    let agent = HostAgent::start(&address, &["--tls-cert", &crt, "--tls-key", &key, "--tls-client-ca", &p("ca.crt")])?;
    Ok((address, agent))
}

/// Each TLS mistake gets a sentence saying which side refused what (exit 7), never a bare "unreachable"; a file
/// that is not what its flag says is a usage error.
#[test]
fn tls_mistakes_are_named_as_tls_mistakes() -> Result<()> {
    let pki = Pki::new();
    let p = |f: &str| pki.path(f).to_str().unwrap().to_string();
    let (tls_address, _tls) = tls_agent(&pki, "agent")?;
    let plain_address = free_address()?;
    let _plain = HostAgent::start(&plain_address, &[])?;
    let tls_url = format!("https://{tls_address}");
    let client = |ca: &str, who: &str| {
        vec![
            "--tls-ca".to_string(),
            p(ca),
            "--tls-cert".into(),
            p(&format!("{who}.crt")),
            "--tls-key".into(),
            p(&format!("{who}.key")),
        ]
    };
    let run = |agent: &str, tls: Vec<String>| -> Result<Output> {
        let mut args = vec!["--agent".to_string(), agent.to_string()];
        args.extend(tls);
        args.push("info".into());
        ctl(&[], &args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    expect(&run(&tls_url, client("ca.crt", "operator"))?, 0, "releases:");
    let cases = [
        (run(&tls_url, client("other-ca.crt", "operator"))?, 7, "the agent's certificate is not signed by the CA in"),
        (run(&tls_url, client("ca.crt", "intruder"))?, 7, "refused this client's certificate"),
        (run(&format!("http://{tls_address}"), vec![])?, 7, "speaks TLS and closed this plaintext connection"),
        (run(&format!("http://{plain_address}"), client("ca.crt", "operator"))?, 7, "does not speak TLS"),
        (run(&tls_url, client("operator.key", "operator"))?, 2, "is not a PEM certificate (--tls-ca)"),
    ];
    for (out, code, says) in cases {
        expect(&out, code, says);
        assert!(!text(&out).contains("is wukong-agent running"), "not 'unreachable': {}", text(&out));
        assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    }
    Ok(())
}

/// An agent's certificate names `wukong-agent`, never an address (cloud-init renders it before the VM has one):
/// wukongctl verifies that name unless told another, wherever it dials.
#[test]
fn agents_are_verified_by_their_name_not_the_address_dialled() -> Result<()> {
    let pki = Pki::new();
    let p = |f: &str| pki.path(f).to_str().unwrap().to_string();
    let (address, _agent) = tls_agent(&pki, "named-agent")?;
    let url = format!("https://{address}");
    let tls = ["--tls-ca", &p("ca.crt"), "--tls-cert", &p("operator.crt"), "--tls-key", &p("operator.key")];
    let run = |extra: &[&str]| ctl(&[], &[&["--agent", url.as_str()][..], &tls[..], extra, &["info"]].concat());
    expect(&run(&[])?, 0, "releases:");
    let by_address = run(&["--tls-server-name", "127.0.0.1"])?;
    expect(&by_address, 7, "this client refused the agent's certificate");
    Ok(())
}

/// `--help` of a subcommand shows the global flags apart, and only the flags that apply.
#[test]
fn help_shows_what_applies() -> Result<()> {
    let info = ctl(&[], &["info", "--help"])?;
    expect(&info, 0, "Target:");
    assert!(!text(&info).contains("--qmp") && !text(&info).contains("--persist"), "{}", text(&info));
    assert!(text(&info).contains("Mutual TLS:") && text(&info).contains("-n, --namespace"), "{}", text(&info));
    let detach = ctl(&[], &["detach", "--help"])?;
    expect(&detach, 0, "Hypervisor:");
    assert!(text(&detach).contains("--qmp <SOCKET>") && text(&detach).contains("--persist"), "{}", text(&detach));
    assert!(!text(&detach).contains("--to-"), "{}", text(&detach));
    let moves = ctl(&[], &["move", "--help"])?;
    expect(&moves, 0, "Move target:");
    for flag in ["--to-vmi <[NS/]NAME>", "--to-qmp <SOCKET>", "--to-agent <ADDRESS>", "--to-volume <NAME>", "--qmp"] {
        assert!(text(&moves).contains(flag), "{flag}: {}", text(&moves));
    }
    // --force is there only to be refused with its reason, which the help says instead of offering the flag.
    assert!(text(&moves).contains("--force is refused: a move exists to keep the data"), "{}", text(&moves));
    let flags = |l: &str| ["--force", "--delete-claim"].iter().any(|f| l.trim_start().starts_with(f));
    assert!(!text(&moves).lines().any(flags), "{}", text(&moves));
    Ok(())
}
