//! Reaching the agent without guest networking, end to end: a QEMU guest with a vsock device and no network device
//! at all, the lab's KubeVirt v1.9 with its `VSOCK` gate (CIDs in `status.VSOCKCID`, the `vsock` subresource as a
//! websocket through the genuine API server's aggregator), and the operator, its admission guard and `wukongctl
//! --vmi`, each as the identity and with the RBAC we ship, reaching the agent through that subresource. Both of
//! KubeVirt's TLS modes: `tls=false` with our mutual TLS inside the stream (the default), and `tls=true` with
//! virt-handler's certificate verified against KubeVirt's CA, which the agent fetched over vsock.

use anyhow::{Context, Result};
use kube::api::{Api, DynamicObject};
use serde_json::{Value, json};
use std::process::Output;
use std::time::{Duration, Instant};
use wukong_controller_client::kubevirt::{vm_resource, vmi_resource};
use wukong_e2e::cluster::{ADMIN, Cluster};
use wukong_e2e::kubevirt_lab::{
    API_SERVER, CONTROLLER, HANDLER, HotplugMode, KubeVirtConfig, KubeVirtLab, VmOptions, bind_companion_rbac,
    removal_patch, template_volumes,
};
use wukong_e2e::kubevirt_vsock::foreign_client_certificate;
use wukong_e2e::operator_lab::{
    OPERATOR, create_wukong, install_operator, json_patch as patch, label, set_disks, shipped_guard,
    start_guarded_with, volume, wait_for_wukong as wait_for,
};
use wukong_e2e::pki::Pki;
use wukong_e2e::{Guest, GuestOptions};
use wukong_operator::crd::{Phase, Wukong};

const NS: &str = "novnet";
/// The companion's user, bound to the shipped deploy/companion-rbac.yaml.
const COMPANION: &str = "companion";
/// The agent's listeners: our mutual TLS on vsock 7443 (KubeVirt's `tls=false`), KubeVirt's TLS on 7444.
const AGENT_ARGS: &str = "--listen vsock://7443 --listen kubevirt-vsock://7444 \
    --tls-cert /etc/wukong-agent/tls/agent.crt --tls-key /etc/wukong-agent/tls/agent.key \
    --tls-client-ca /etc/wukong-agent/tls/client-ca.crt --allow-client operator --allow-client wukong-companion";

fn vms(client: &kube::Client) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), NS, &vm_resource())
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// A guest with vsock and no network, the cluster with the lab's KubeVirt (VSOCK gate on, claims as image files),
/// the operator's CRD and RBAC, the companion's RBAC, and vsock VMs `db-vm` and `tool-vm`, whose guest's agent
/// serves mutual TLS on vsock://7443 and KubeVirt's TLS on kubevirt-vsock://7444.
struct Lab {
    guest: Guest,
    cluster: Cluster,
    kubevirt: KubeVirtLab,
    pki: Pki,
    admin: kube::Client,
    _images: tempfile::TempDir,
}

async fn lab() -> Result<Lab> {
    let pki = Pki::new();
    let guest = Guest::boot_with_options(&GuestOptions { vsock: true, network: false, ..Default::default() }).await?;
    let cluster = Cluster::start(&[OPERATOR, API_SERVER, CONTROLLER, HANDLER, COMPANION]).await?;
    let config = KubeVirtConfig { hotplug: HotplugMode::Declarative, vsock: true };
    let kubevirt = KubeVirtLab::start_with(&cluster, Some(&guest), NS, config).await?;
    let images = tempfile::tempdir()?;
    kubevirt.provision(images.path(), "lab-images").await?;
    install_operator(&cluster).await?;
    bind_companion_rbac(&cluster, NS, COMPANION, None).await?;
    let vsock = VmOptions { interface_ip: None, vsock: true, ..Default::default() };
    for vm in ["db-vm", "tool-vm"] {
        kubevirt.create_vm_with(vm, true, &vsock).await?;
    }
    let files = [
        (pki.path("named-agent.crt"), "/etc/wukong-agent/tls/agent.crt"),
        (pki.path("named-agent.key"), "/etc/wukong-agent/tls/agent.key"),
        (pki.path("ca.crt"), "/etc/wukong-agent/tls/client-ca.crt"),
    ];
    let files: Vec<(&std::path::Path, &str)> = files.iter().map(|(from, to)| (from.as_path(), *to)).collect();
    guest.install_agent(&files, AGENT_ARGS, Some(pki.client("wukong-companion"))).await?;
    let admin = cluster.client(ADMIN).await?;
    Ok(Lab { guest, cluster, kubevirt, pki, admin, _images: images })
}

impl Lab {
    /// wukongctl as the companion's user (its kubeconfig only: no address, no network route) against VMI `vm`,
    /// with the client certificate `client`.
    fn ctl(&self, vm: &str, client: &str, args: &[&str]) -> Result<Output> {
        let mut command = self.command(vm, client, args)?;
        tokio::task::block_in_place(|| command.output()).context("running wukongctl")
    }

    fn command(&self, vm: &str, client: &str, args: &[&str]) -> Result<std::process::Command> {
        let tls = self.pki.client(client);
        let mut command = self.kubeconfig_only(vm, &[])?;
        command.arg("--tls-ca").arg(&tls.ca).arg("--tls-cert").arg(&tls.cert).arg("--tls-key").arg(&tls.key);
        command.args(args);
        Ok(command)
    }

    /// wukongctl as on a laptop with nothing but a kubeconfig (the companion's) and `--vmi`.
    fn kubeconfig_only(&self, vm: &str, args: &[&str]) -> Result<std::process::Command> {
        let mut command = std::process::Command::new(wukong_e2e::wukongctl_binary());
        command
            .env_clear()
            .env("KUBECONFIG", self.cluster.kubeconfig(COMPANION)?)
            .args(["--vmi", &format!("{NS}/{vm}")])
            .args(args)
            .stdin(std::process::Stdio::null());
        Ok(command)
    }

    /// The agent's log lines that say it refused a TLS connection.
    async fn refusals(&self) -> Result<Vec<String>> {
        let log = self.agent_log().await?;
        Ok(log.lines().filter(|l| l.contains("refused a TLS connection")).map(String::from).collect())
    }

    /// Requests to the `vsock` subresource in the API server's audit log: (user, request URI, HTTP code).
    fn vsock_requests(&self) -> Result<Vec<(String, String, u16)>> {
        let audit = self.cluster.audit()?.into_iter().filter(|e| e.request_uri.contains("/vsock?"));
        Ok(audit.map(|e| (e.user.username.clone(), e.request_uri.clone(), e.code())).collect())
    }

    /// The agent's log in the guest.
    async fn agent_log(&self) -> Result<String> {
        self.guest.run_ok("cat /var/log/wukong-agent.log").await
    }
}

/// The operator's agent client files, laid out as its mounted Secret: the CA, and its certificate `operator`.
fn operator_tls(pki: &Pki) -> Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    for (from, to) in [("ca.crt", "ca.crt"), ("operator.crt", "tls.crt"), ("operator.key", "tls.key")] {
        std::fs::copy(pki.path(from), dir.path().join(to))?;
    }
    Ok(dir)
}

/// A guest with no network device: a `Wukong` disk is plugged, its removal refused naming the writer and then done
/// by the operator once the writer stops; a JSON patch unplug is denied and then allowed by the guard; `wukongctl
/// --vmi` attaches and detaches; all through KubeVirt's vsock subresource with our mutual TLS inside (`tls=false`),
/// each caller named in the API server's audit log.
#[tokio::test(flavor = "multi_thread")]
async fn a_guest_without_networking_is_served_through_kubevirts_vsock_subresource() -> Result<()> {
    let lab = lab().await?;
    let (guest, admin) = (&lab.guest, &lab.admin);
    assert!(guest.run_ok("ls /sys/class/net").await?.split_whitespace().all(|n| n == "lo"), "no NIC at all");
    let vmi = Api::<DynamicObject>::namespaced_with(admin.clone(), NS, &vmi_resource()).get("db-vm").await?;
    let cid = vmi.data["status"]["VSOCKCID"].as_u64().context("a VSOCKCID")?;
    assert!(cid >= 3, "{cid}");
    assert!(vmi.data["status"]["interfaces"].as_array().is_none_or(|i| i.is_empty()), "no IP to dial: {vmi:?}");

    let tls = operator_tls(&lab.pki)?;
    let dir = tls.path().to_str().context("a UTF-8 path")?;
    let extra = ["--guard-grace-seconds", "3"];
    let _operator =
        start_guarded_with(&lab.cluster, "vsock-op", &["--agent-tls-dir", dir], &extra, shipped_guard()?).await?;
    let api: Api<Wukong> = Api::namespaced(admin.clone(), NS);
    let root = json!({"name": "rootdisk", "system": true});
    let data = json!({"name": "data", "size": "64Mi", "detachOptions": {"unmount": true}});
    let started = Instant::now();
    create_wukong(&api, "db", json!({"cpu": 1, "memory": "1Gi", "disks": [root, data]})).await?;
    let w = wait_for(&api, "db", 120, |w| volume(w, "data").is_some_and(|v| v.phase == Phase::Attached)).await?;
    println!("add a disk over vsock → Attached in {:.1} s", started.elapsed().as_secs_f64());
    let dev = volume(&w, "data").and_then(|v| v.device.clone()).context("the guest's device in status")?;
    let sum = guest.fill(&dev, "/mnt/d", 4 << 20).await?;
    let pid = guest.start_writer("/mnt/d").await?;

    // kubectl's JSON patch unplug of a busy disk: the guard asks the guest over vsock and denies, naming the writer.
    let vms = vms(admin);
    label(&vms, "db-vm", json!({"vm.novasphere.dev/guard": "enabled"}), json!({})).await?;
    let remove = removal_patch(&vms.get("db-vm").await?, "/spec/template/spec", "data")?;
    let (code, message) = patch(&vms, "db-vm", remove, false).await?.expect_err("a busy disk's unplug is denied");
    assert_eq!(code, 403, "{message}");
    assert!(message.contains(&format!("pid {pid}")), "the writer is named: {message}");

    // The Wukong loses the disk: refused with the writer named, then detached by the operator once it stops.
    set_disks(&api, "db", json!([root])).await?;
    let w = wait_for(&api, "db", 60, |w| volume(w, "data").is_some_and(|v| v.phase == Phase::DetachBlocked)).await?;
    let v = volume(&w, "data").context("data in status")?;
    assert!(v.blockers.iter().any(|b| b.contains(&format!("pid {pid}"))), "the writer's pid in status: {v:?}");
    assert_eq!(guest.checksum("/mnt/d/data").await?, sum, "the data is intact");
    guest.stop_process(&pid).await?;
    let stopped = Instant::now();
    wait_for(&api, "db", 90, |w| volume(w, "data").is_none()).await?;
    println!("writer stopped → detached over vsock in {:.1} s", stopped.elapsed().as_secs_f64());
    guest.wait_unplugged("data", Duration::from_secs(30)).await?;

    // wukongctl --vmi with a kubeconfig only: attach, a refused detach, the guard's denial, then both allowed.
    lab.kubevirt.create_claim("pvc-x", &guest.new_image(32 << 20)?).await?;
    label(&vms, "tool-vm", json!({"vm.novasphere.dev/guard": "enabled"}), json!({})).await?;
    let out = lab.ctl("tool-vm", "wukong-companion", &["-o", "json", "attach", "x", "--claim", "pvc-x"])?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let attached: Value = serde_json::from_slice(&out.stdout)?;
    let dev = attached["disk"]["dev_node"].as_str().context("the guest's device")?.to_string();
    guest.fill(&dev, "/mnt/x", 1 << 20).await?;
    let pid = guest.start_writer("/mnt/x").await?;
    let refused = lab.ctl("tool-vm", "wukong-companion", &["detach", "x", "--unmount"])?;
    assert_eq!(refused.status.code(), Some(3), "{}", text(&refused));
    assert!(text(&refused).contains(&format!("pid {pid}")), "{}", text(&refused));
    let remove = removal_patch(&vms.get("tool-vm").await?, "/spec/template/spec", "x")?;
    let (code, message) = patch(&vms, "tool-vm", remove.clone(), false).await?.expect_err("denied");
    assert!(code == 403 && message.contains(&format!("pid {pid}")), "{code}: {message}");
    guest.stop_process(&pid).await?;
    label(&vms, "tool-vm", json!({}), json!({"vm.novasphere.dev/unmount-on-detach": "true"})).await?;
    patch(&vms, "tool-vm", remove, false).await?.expect("the idle disk's unplug is allowed");
    guest.wait_unplugged("x", Duration::from_secs(60)).await?;
    assert!(!template_volumes(&serde_json::to_value(vms.get("tool-vm").await?)?).contains(&"x".to_string()));
    let out = lab.ctl("tool-vm", "wukong-companion", &["attach", "x", "--claim", "pvc-x"])?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = lab.ctl("tool-vm", "wukong-companion", &["detach", "x", "--unmount"])?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    guest.wait_unplugged("x", Duration::from_secs(30)).await?;

    // Every way in went through the subresource, as its caller, with our TLS inside (tls=false).
    let requests = lab.vsock_requests()?;
    let path = format!("/apis/subresources.kubevirt.io/v1/namespaces/{NS}/virtualmachineinstances/");
    for user in [OPERATOR, COMPANION] {
        assert!(
            requests
                .iter()
                .any(|(u, uri, _)| u == user && uri.starts_with(&path) && uri.ends_with("port=7443&tls=false")),
            "{user} dialled through the subresource: {requests:#?}"
        );
    }
    // The agent's audit names the operator and the companion by their certificates, not virt-handler.
    let log = lab.agent_log().await?;
    let released_by = |who: &str| log.lines().any(|l| l.contains("allowed a release") && l.contains(who));
    assert!(released_by("client=\"operator\"") && released_by("client=\"wukong-companion\""), "{log}");
    Ok(())
}

/// KubeVirt's `tls=true`: the agent verifies virt-handler's certificate against the CA it fetched over vsock, and
/// refuses another CA's. Our mode refuses a client of another CA. A call made while the agent is down is served once
/// it is up; a guest that never answers gives a bounded error that names the transport.
#[tokio::test(flavor = "multi_thread")]
async fn both_tls_modes_and_bounded_failures_over_vsock() -> Result<()> {
    let lab = lab().await?;
    let kubevirt_tls = ["--agent-vsock-tls", "kubevirt", "--agent-port", "7444"];
    let info = |client: &str, extra: &[&str]| {
        let mut args = extra.to_vec();
        args.push("info");
        lab.ctl("db-vm", client, &args)
    };
    let started = Instant::now();
    let mut kubevirt_ready = false;
    // The agent fetches KubeVirt's CA in the background after its start, with backoff.
    while !kubevirt_ready && started.elapsed() < Duration::from_secs(30) {
        kubevirt_ready = info("wukong-companion", &kubevirt_tls)?.status.success();
        if !kubevirt_ready {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    assert!(kubevirt_ready, "tls=true served once the CA is fetched; agent log:\n{}", lab.agent_log().await?);
    assert!(lab.agent_log().await?.contains("KubeVirt's CA bundle fetched"), "{}", lab.agent_log().await?);
    // With KubeVirt's TLS, a laptop needs only its kubeconfig: no files of ours, the subresource's RBAC decides.
    let mut bare = lab.kubeconfig_only("db-vm", &[&kubevirt_tls[..], &["info"]].concat())?;
    let out = tokio::task::block_in_place(|| bare.output())?;
    assert_eq!(out.status.code(), Some(0), "kubeconfig only, tls=true: {}", text(&out));
    let requests = lab.vsock_requests()?;
    assert!(requests.iter().any(|(u, uri, _)| u == COMPANION && uri.ends_with("port=7444&tls=true")), "{requests:#?}");

    // A release over KubeVirt's TLS: RBAC on the subresource decided, the agent logs KubeVirt's identity.
    lab.kubevirt.create_claim("pvc-k", &lab.guest.new_image(16 << 20)?).await?;
    let out = lab.ctl("db-vm", "wukong-companion", &["attach", "k", "--claim", "pvc-k"])?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let mut args = kubevirt_tls.to_vec();
    args.extend(["detach", "k"]);
    let out = lab.ctl("db-vm", "wukong-companion", &args)?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let log = lab.agent_log().await?;
    let by_kubevirt = "client=\"KubeVirt's vsock subresource (kubevirt.io:system:client:vsock)\"";
    assert!(log.lines().any(|l| l.contains("allowed a release") && l.contains(by_kubevirt)), "{log}");

    // virt-handler with a certificate of another CA: the agent refuses the handshake, and says so.
    let before = lab.refusals().await?.len();
    lab.kubevirt.set_vsock_client_certificate(Some(&foreign_client_certificate()?))?;
    let refused = info("wukong-companion", &kubevirt_tls)?;
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(text(&refused).contains("KubeVirt's vsock subresource of VMI"), "names the transport: {}", text(&refused));
    lab.kubevirt.set_vsock_client_certificate(None)?;
    let refusals = lab.refusals().await?;
    assert!(refusals[before..].iter().any(|l| l.contains("peer=vsock:")), "the agent refused it: {refusals:#?}");
    // Our mode: a client certificate of another CA is refused by the agent.
    let before = refusals.len();
    let refused = info("intruder", &[])?;
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(text(&refused).contains("KubeVirt's vsock subresource of VMI"), "{}", text(&refused));
    let refusals = lab.refusals().await?;
    assert!(refusals[before..].iter().any(|l| l.contains("peer=vsock:")), "the agent refused it: {refusals:#?}");

    // The agent is down when the call starts and up 3 s later: the call is served.
    let guest = &lab.guest;
    guest.run_ok("kill $(pidof wukong-agent); while pidof wukong-agent >/dev/null; do usleep 50000; done").await?;
    let mut command = lab.command("db-vm", "wukong-companion", &["info"])?;
    let waiting = tokio::task::spawn_blocking(move || command.output());
    tokio::time::sleep(Duration::from_secs(3)).await;
    guest.run_ok(&format!("setsid wukong-agent {AGENT_ARGS} </dev/null >>/var/log/wukong-agent.log 2>&1 &")).await?;
    let out = waiting.await??;
    assert_eq!(out.status.code(), Some(0), "a call made before the agent was up: {}", text(&out));

    // The guest stops answering (its VM paused): a bounded error naming the transport and the address.
    guest.qmp.execute("stop", None).await?;
    let started = Instant::now();
    let socket = guest.vsock_socket();
    let address = format!("hvsock://{}:7443", socket.display());
    let tls = lab.pki.client("wukong-companion");
    let mut command = std::process::Command::new(wukong_e2e::wukongctl_binary());
    command.env_clear().args(["--agent", &address, "--tls-ca"]).arg(&tls.ca);
    command.arg("--tls-cert").arg(&tls.cert).arg("--tls-key").arg(&tls.key).arg("info");
    let silent = tokio::task::block_in_place(|| command.output())?;
    let took = started.elapsed();
    // And through KubeVirt's subresource, from a laptop.
    let started = Instant::now();
    let through_api = lab.ctl("db-vm", "wukong-companion", &["info"])?;
    let took_through_api = started.elapsed();
    guest.qmp.execute("cont", None).await?;
    assert_eq!(silent.status.code(), Some(4), "{}", text(&silent));
    assert!(text(&silent).contains(&format!("the agent at {address} did not answer CONNECT")), "{}", text(&silent));
    assert!(took < Duration::from_secs(20), "bounded: {took:?}");
    assert_eq!(through_api.status.code(), Some(4), "{}", text(&through_api));
    assert!(text(&through_api).contains("KubeVirt's vsock subresource of VMI"), "{}", text(&through_api));
    assert!(took_through_api < Duration::from_secs(30), "bounded: {took_through_api:?}");
    println!(
        "a silent guest is reported after {:.1} s over hybrid vsock, {:.1} s through the subresource",
        took.as_secs_f64(),
        took_through_api.as_secs_f64()
    );
    Ok(())
}
