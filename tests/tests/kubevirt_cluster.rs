//! `wukongctl --vmi` end to end through a genuine kube-apiserver: KubeVirt's CRDs, its hot-plug subresources as an
//! aggregated API, and a lab controller that plugs into the QEMU guest and, like KubeVirt, checks nothing before an
//! unplug. wukongctl runs with a token bound only to the ClusterRoles shipped in deploy/companion-rbac.yaml. What
//! did and did not reach the server is read from the server's own audit log.

use anyhow::{Context, Result};
use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use serde_json::{Value, json};
use std::process::Output;
use wukong_e2e::Guest;
use wukong_e2e::cluster::{ADMIN, AuditEvent, Cluster};
use wukong_e2e::kubevirt_lab::{
    API_SERVER, CONTROLLER, HANDLER, HotplugMode, KubeVirtLab, bind_companion_rbac, template_volumes,
};

const NS: &str = "ns1";
/// The identity wukongctl runs as, bound to the shipped roles only.
const COMPANION: &str = "companion";
/// Another identity, bound to the shipped role with one rule taken out.
const LACKING: &str = "companion-lacking";

struct Lab {
    guest: Guest,
    cluster: Cluster,
    kubevirt: KubeVirtLab,
    image: std::path::PathBuf,
}

fn dynamic(kind: &str, group: &str, plural: &str) -> ApiResource {
    let api_version = if group.is_empty() { "v1".to_string() } else { format!("{group}/v1") };
    ApiResource { group: group.into(), version: "v1".into(), api_version, kind: kind.into(), plural: plural.into() }
}

async fn lab(mode: HotplugMode) -> Result<Lab> {
    let guest = Guest::boot().await?;
    let cluster = Cluster::start(&[COMPANION, LACKING, API_SERVER, CONTROLLER, HANDLER]).await?;
    let kubevirt = KubeVirtLab::start(&cluster, Some(&guest), NS, mode).await?;
    bind_companion_rbac(&cluster, NS, COMPANION, None).await?;
    let image = guest.new_image(64 << 20)?;
    kubevirt.create_claim("pvc-a", &image).await?;
    kubevirt.create_vm("vm1", true, "10.0.2.15").await?;
    Ok(Lab { guest, cluster, kubevirt, image })
}

impl Lab {
    /// Runs wukongctl as `user`. The lab's virt-api and controller run in this process: the wait must not hold a
    /// runtime worker (tasks parked on it would wait for wukongctl, which waits for them).
    fn ctl_as(&self, user: &str, args: &[&str]) -> Result<Output> {
        self.ctl_on(user, "vm1", args)
    }

    /// Runs wukongctl as `user` against VMI `vmi` of NS.
    fn ctl_on(&self, user: &str, vmi: &str, args: &[&str]) -> Result<Output> {
        let mut command = self.command(user, vmi, args)?;
        tokio::task::block_in_place(|| command.output()).context("running wukongctl")
    }

    /// wukongctl as `user` against VMI `vmi` of NS, reaching the lab guest's agent, with nothing inherited.
    fn command(&self, user: &str, vmi: &str, args: &[&str]) -> Result<std::process::Command> {
        let mut command = std::process::Command::new(wukong_e2e::wukongctl_binary());
        command
            .env_clear()
            .env("KUBECONFIG", self.cluster.kubeconfig(user)?)
            .args(["--vmi", &format!("{NS}/{vmi}"), "--agent", &self.guest.agent_address().to_string()])
            .args(args)
            .stdin(std::process::Stdio::null());
        Ok(command)
    }

    fn ctl(&self, args: &[&str]) -> Result<Output> {
        self.ctl_as(COMPANION, args)
    }

    /// wukongctl in the background (a detach still waiting while another starts).
    fn spawn_ctl(&self, args: &[&str]) -> Result<std::process::Child> {
        self.command(COMPANION, "vm1", args)?
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("running wukongctl")
    }

    /// How many removevolume requests reached the API server so far.
    fn removevolumes(&self) -> Result<usize> {
        Ok(self.cluster.audit()?.iter().filter(|e| e.request_uri.contains("/removevolume")).count())
    }

    /// The answers to the removevolume requests wukongctl sent so far, in order.
    fn companion_removevolumes(&self) -> Result<Vec<u16>> {
        let audit = self.cluster.audit()?.into_iter();
        Ok(audit
            .filter(|e| e.request_uri.contains("/removevolume") && e.user.username == COMPANION)
            .map(|e| e.code())
            .collect())
    }

    async fn attach_data1(&self) -> Result<String> {
        let out = self.ctl(&["-o", "json", "attach", "data1", "--claim", "pvc-a", "--timeout", "90"])?;
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        Ok(json_of(&out)?["disk"]["dev_node"].as_str().context("the guest's device")?.to_string())
    }

    /// The guest never gets the disk back while KubeVirt unplugs it: no CancelDetach, so no rescan, no remount.
    async fn assert_not_given_back(&self) -> Result<()> {
        self.guest.run_ok("! grep -q ' /mnt/k ' /proc/mounts").await.context("the released disk was mounted again")?;
        Ok(())
    }

    async fn object(&self, kind: &str, plural: &str, name: &str) -> Result<Value> {
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.cluster.client(ADMIN).await?, NS, &dynamic(kind, "kubevirt.io", plural));
        Ok(serde_json::to_value(api.get(name).await?)?)
    }

    /// The audit log from `mark` on: requests that changed a VM or VMI, or asked for a hot-plug, by anyone but the
    /// lab's KubeVirt (whose status writes are plain VMI updates: the VMI has no status subresource).
    fn hotplug_writes_since(&self, mark: usize) -> Result<Vec<AuditEvent>> {
        Ok(self
            .cluster
            .audit()?
            .into_iter()
            .skip(mark)
            .filter(|e| {
                let Some(r) = &e.object_ref else { return false };
                let vm_or_vmi = matches!(r.resource.as_str(), "virtualmachines" | "virtualmachineinstances");
                let subresource = r.subresource.as_deref();
                let kubevirt = [API_SERVER, CONTROLLER, HANDLER].contains(&e.user.username.as_str());
                vm_or_vmi
                    && !kubevirt
                    && (matches!(subresource, Some("addvolume" | "removevolume"))
                        || (e.is_write() && subresource.is_none()))
            })
            .collect())
    }
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn json_of(out: &Output) -> Result<Value> {
    serde_json::from_slice(&out.stdout).with_context(|| format!("JSON from wukongctl: {}", text(out)))
}

/// KubeVirt 1.9's default (declarative hot-plug): attach, a refused detach that sends nothing, a safe detach,
/// re-attach with the data intact, --force with the agent stopped, bad input, and the RBAC each step needs.
#[tokio::test(flavor = "multi_thread")]
async fn declarative_hotplug_through_a_real_api_server_is_safe() -> Result<()> {
    let lab = lab(HotplugMode::Declarative).await?;

    let out = lab.ctl(&["-o", "json", "attach", "data1", "--claim", "pvc-a", "--timeout", "90"])?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let attached = json_of(&out)?;
    assert_eq!(attached["disk"]["serial"], "data1", "the serial is the volume name, as virtctl gives it");
    assert_eq!(attached["kubevirt_route"], "vm (declarative hot-plug)");
    let dev = attached["disk"]["dev_node"].as_str().context("the guest's device")?.to_string();
    let vm = lab.object("VirtualMachine", "virtualmachines", "vm1").await?;
    assert!(template_volumes(&vm).contains(&"data1".to_string()), "the VM's spec holds the volume: {vm}");
    let disk = &vm["spec"]["template"]["spec"]["domain"]["devices"]["disks"];
    assert!(disk.as_array().unwrap().iter().any(|d| d["name"] == "data1" && d["serial"] == "data1"), "{disk}");
    // The exact request, as virt-api received it through the API server, with the caller it vouched for.
    let add = lab.kubevirt.received().into_iter().find(|r| r.path.ends_with("/addvolume"));
    let add = add.context("an addvolume at virt-api")?;
    assert_eq!(add.path, format!("/apis/subresources.kubevirt.io/v1/namespaces/{NS}/virtualmachines/vm1/addvolume"));
    assert_eq!(add.user, COMPANION);
    assert_eq!(
        add.body,
        Some(json!({"name": "data1", "disk": {"name": "data1", "serial": "data1", "disk": {"bus": "scsi"}},
                    "volumeSource": {"persistentVolumeClaim": {"claimName": "pvc-a", "hotpluggable": true}}}))
    );
    let audited = lab.cluster.audit()?.into_iter().filter(|e| e.request_uri == add.path && e.code() == 202).count();
    assert_eq!(audited, 1, "the API server's audit log has the same request");

    let sum = lab.guest.fill(&dev, "/mnt/k", 4 << 20).await?;
    let pid =
        lab.guest.run_ok("sh -c 'exec 3>>/mnt/k/log; exec sleep 1000' </dev/null >/dev/null 2>&1 & echo $!").await?;
    let mark = lab.cluster.audit()?.len();
    let refused = lab.ctl(&["detach", "data1", "--unmount"])?;
    assert_eq!(refused.status.code(), Some(3), "{}", text(&refused));
    assert!(text(&refused).contains(&format!("sleep (pid {}", pid.trim())), "{}", text(&refused));
    let writes = lab.hotplug_writes_since(mark)?;
    assert!(writes.is_empty(), "a refused detach reaches no VM or VMI spec and sends no removevolume: {writes:#?}");

    lab.guest.run_ok(&format!("kill {0}; while kill -0 {0} 2>/dev/null; do usleep 50000; done", pid.trim())).await?;
    let out = lab.ctl(&["-o", "json", "detach", "data1", "--unmount", "--timeout", "90"])?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let vm = lab.object("VirtualMachine", "virtualmachines", "vm1").await?;
    assert!(!template_volumes(&vm).contains(&"data1".to_string()), "gone from the VM's spec: {vm}");
    let vmi = lab.object("VirtualMachineInstance", "virtualmachineinstances", "vm1").await?;
    let statuses = vmi["status"]["volumeStatus"].as_array().cloned().unwrap_or_default();
    assert!(!statuses.iter().any(|s| s["name"] == "data1"), "the VMI's status entry is gone: {statuses:?}");
    let removals: Vec<_> =
        lab.hotplug_writes_since(mark)?.into_iter().filter(|e| e.request_uri.contains("/removevolume")).collect();
    assert_eq!(removals.len(), 1, "one removevolume, through the VM: {removals:#?}");
    assert!(removals[0].request_uri.contains("/virtualmachines/vm1/removevolume"), "{:?}", removals[0].request_uri);
    assert_eq!(removals[0].user.username, COMPANION);

    let out = lab.ctl(&["-o", "json", "attach", "data1", "--claim", "pvc-a", "--timeout", "90"])?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let dev = json_of(&out)?["disk"]["dev_node"].as_str().unwrap().to_string();
    lab.guest.run_ok(&format!("mount {dev} /mnt/k")).await?;
    assert_eq!(lab.guest.checksum("/mnt/k/data").await?, sum, "data intact after detach and re-attach");
    lab.guest.run_ok("umount /mnt/k").await?;

    // v1.9's declarative rule as the lab's virt-api plays it: VMI requests for a VM-owned VMI are refused.
    let admin = lab.cluster.client(ADMIN).await?;
    let path = format!("/apis/subresources.kubevirt.io/v1/namespaces/{NS}/virtualmachineinstances/vm1/addvolume");
    let body =
        json!({"name": "x", "disk": {"name": "x"}, "volumeSource": {"persistentVolumeClaim": {"claimName": "pvc-a"}}});
    let request =
        http::Request::put(path).header("content-type", "application/json").body(serde_json::to_vec(&body)?)?;
    match admin.request_text(request).await {
        Err(kube::Error::Api(s)) => assert_eq!((s.code, s.message.as_str()), (400, "VMI ns1/vm1 is owned by a VM")),
        other => panic!("expected a 400, got {other:?}"),
    }

    // A standalone VMI keeps its own subresources.
    lab.kubevirt.create_vm("solo", false, "10.0.2.15").await?;
    lab.kubevirt.create_claim("pvc-b", &lab.guest.new_image(16 << 20)?).await?;
    let out =
        lab.ctl_on(COMPANION, "solo", &["-o", "json", "attach", "data2", "--claim", "pvc-b", "--timeout", "90"])?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(json_of(&out)?["kubevirt_route"], "vmi");
    let out = lab.ctl_on(COMPANION, "solo", &["detach", "data2", "--timeout", "90"])?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    // Bad input: a named error each, and nothing written.
    let mark = lab.cluster.audit()?.len();
    let out = lab.ctl_on(COMPANION, "nope", &["detach", "data1"])?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("\"nope\" not found"), "{}", text(&out));
    let bad: [(&[&str], i32, &str); 3] = [
        (&["detach", "rootdisk"], 1, "volume 'rootdisk' is not hotpluggable"),
        (&["attach", "data2", "--claim", "pvc-a", "--serial", "Not/Portable"], 2, "is not a portable serial"),
        (&["attach", "Data2", "--claim", "pvc-a"], 2, "'Data2' is not a volume name"),
    ];
    for (args, code, says) in bad {
        let out = lab.ctl(args)?;
        assert_eq!(out.status.code(), Some(code), "{args:?}: {}", text(&out));
        assert!(text(&out).contains(says), "{args:?}: {}", text(&out));
    }
    let unknown = lab.ctl(&["detach", "nosuch"])?;
    assert!(text(&unknown).contains("nosuch is not attached; nothing to do"), "{}", text(&unknown));
    assert!(lab.hotplug_writes_since(mark)?.is_empty(), "bad input changes nothing on the server");

    // Each shipped rule is needed: without `get` on VMIs the command fails and says which verb and resource.
    bind_companion_rbac(&lab.cluster, NS, LACKING, Some(("get", "virtualmachineinstances"))).await?;
    let out = lab.ctl_as(LACKING, &["detach", "data1", "--unmount"])?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("cannot get resource \"virtualmachineinstances\" in API group \"kubevirt.io\""),
        "{}",
        text(&out)
    );
    assert!(text(&out).contains("deploy/companion-rbac.yaml"), "{}", text(&out));

    // The agent is down: refused (fail safe), unless forced.
    lab.guest.run_ok("kill $(pidof wukong-agent); while pidof wukong-agent >/dev/null; do usleep 50000; done").await?;
    let mark = lab.cluster.audit()?.len();
    let out = lab.ctl(&["detach", "data1", "--unmount"])?;
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(lab.hotplug_writes_since(mark)?.is_empty(), "fail safe: nothing sent while the agent is down");
    let out = lab.ctl(&["detach", "data1", "--force", "--timeout", "90"])?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("WARNING: data1 was detached with --force"), "{}", text(&out));
    lab.guest.restart_agent().await?;
    println!("cluster started in {:.1} s; image {}", lab.cluster.started_in.as_secs_f64(), lab.image.display());
    Ok(())
}

/// With the deprecated `HotplugVolumes` gate, a VM-owned VMI keeps VMI (ephemeral) hot-plug; --persist goes
/// through the VM. Both are safe the same way.
#[tokio::test(flavor = "multi_thread")]
async fn hotplug_volumes_mode_through_a_real_api_server_is_safe() -> Result<()> {
    let lab = lab(HotplugMode::HotplugVolumes).await?;
    let out = lab.ctl(&["-o", "json", "attach", "data1", "--claim", "pvc-a", "--timeout", "90"])?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let attached = json_of(&out)?;
    assert_eq!(attached["kubevirt_route"], "vmi");
    let vm = lab.object("VirtualMachine", "virtualmachines", "vm1").await?;
    assert!(!template_volumes(&vm).contains(&"data1".to_string()), "ephemeral: the VM's spec is unchanged");
    let dev = attached["disk"]["dev_node"].as_str().unwrap().to_string();
    let sum = lab.guest.fill(&dev, "/mnt/k", 4 << 20).await?;

    let mark = lab.cluster.audit()?.len();
    let refused = lab.ctl(&["detach", "data1"])?;
    assert_eq!(refused.status.code(), Some(3), "{}", text(&refused));
    assert!(lab.hotplug_writes_since(mark)?.is_empty(), "a refused detach sends nothing");
    // virt-api's VMI patch loses a race with virt-controller's write: KubeVirt answers 422, and the detach asks again.
    lab.kubevirt.lose_next_race();
    let out = lab.ctl(&["detach", "data1", "--unmount", "--timeout", "90"])?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(lab.companion_removevolumes()?, [422, 202], "the lost race is retried");

    let out = lab.ctl(&["-o", "json", "attach", "data1", "--claim", "pvc-a", "--persist", "--timeout", "90"])?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(json_of(&out)?["kubevirt_route"], "vm (--persist)");
    let vm = lab.object("VirtualMachine", "virtualmachines", "vm1").await?;
    assert!(template_volumes(&vm).contains(&"data1".to_string()), "--persist: in the VM's spec");
    let dev = json_of(&out)?["disk"]["dev_node"].as_str().unwrap().to_string();
    lab.guest.run_ok(&format!("mount {dev} /mnt/k")).await?;
    assert_eq!(lab.guest.checksum("/mnt/k/data").await?, sum, "data intact");
    let out = lab.ctl(&["detach", "data1", "--unmount", "--persist", "--timeout", "90"])?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let vm = lab.object("VirtualMachine", "virtualmachines", "vm1").await?;
    assert!(!template_volumes(&vm).contains(&"data1".to_string()), "gone from the VM's spec");
    Ok(())
}

/// Issue 29: with the `HotplugVolumes` gate the VM's removevolume only records a request in
/// `vm.status.volumeRequests`, and virt-controller carries it out later. A detach run again while that request is
/// pending (virt-controller down, then refused by virt-api on each try) joins it: it never gives the guest its disk
/// back and sends no second removevolume; once virt-controller gets through, the retry finishes the removal.
#[tokio::test(flavor = "multi_thread")]
async fn a_retried_detach_joins_a_pending_volume_request_in_hotplug_volumes_mode() -> Result<()> {
    let lab = lab(HotplugMode::HotplugVolumes).await?;
    let out = lab.ctl(&["-o", "json", "attach", "data1", "--claim", "pvc-a", "--persist", "--timeout", "90"])?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let dev = json_of(&out)?["disk"]["dev_node"].as_str().context("the guest's device")?.to_string();
    let sum = lab.guest.fill(&dev, "/mnt/k", 4 << 20).await?;
    let vm = lab.object("VirtualMachine", "virtualmachines", "vm1").await?;
    assert!(template_volumes(&vm).contains(&"data1".to_string()), "virt-controller stored the template: {vm}");
    let requests = vm["status"]["volumeRequests"].as_array().cloned().unwrap_or_default();
    assert!(requests.is_empty(), "and dropped the done request: {vm}");

    // virt-controller is down when the removal is asked for: the request waits, the detach gives up waiting.
    lab.kubevirt.pause_controller(true);
    let detach = ["-o", "json", "detach", "data1", "--unmount", "--persist", "--timeout", "2"];
    let first = lab.ctl(&detach)?;
    assert_eq!(first.status.code(), Some(5), "{}", text(&first));
    assert_eq!(json_of(&first)?["removal_in_progress"], true, "{}", text(&first));
    let vm = lab.object("VirtualMachine", "virtualmachines", "vm1").await?;
    assert_eq!(vm["status"]["volumeRequests"], json!([{"removeVolumeOptions": {"name": "data1"}}]), "{vm}");
    assert!(template_volumes(&vm).contains(&"data1".to_string()), "nothing carried out yet: {vm}");

    // Run again while the request is pending: it joins the removal (virt-api would answer 409), the disk stays
    // released.
    let second = lab.ctl(&detach)?;
    assert_eq!(second.status.code(), Some(5), "{}", text(&second));
    let error = json_of(&second)?;
    assert_eq!(error["removal_in_progress"], true, "{error}");
    assert!(error["error"].as_str().unwrap_or_default().contains("Run detach again to wait for it"), "{error}");
    assert!(!text(&second).contains("CancelDetach"), "{}", text(&second));
    lab.assert_not_given_back().await?;
    assert!(!lab.guest.has_disk("data1").await, "disk data1 stays released in the guest");
    assert_eq!(lab.companion_removevolumes()?, [202], "no second removevolume");

    // virt-controller is back but virt-api refuses its VMI removevolume: the request stays pending, retried.
    lab.kubevirt.refuse_removals(Some("the attachment pod could not be deleted"));
    lab.kubevirt.pause_controller(false);
    let third = lab.ctl(&detach)?;
    assert_eq!(third.status.code(), Some(5), "{}", text(&third));
    lab.assert_not_given_back().await?;
    let refused = |e: &AuditEvent| {
        e.user.username == CONTROLLER && e.request_uri.contains("/virtualmachineinstances/vm1/removevolume")
    };
    assert!(
        lab.cluster.audit()?.iter().any(|e| refused(e) && e.code() == 500),
        "virt-controller tried and was refused"
    );

    // It gets through: the retry waits for the removal to end.
    lab.kubevirt.refuse_removals(None);
    let last = lab.ctl(&["-o", "json", "detach", "data1", "--unmount", "--persist", "--timeout", "60"])?;
    assert_eq!(last.status.code(), Some(0), "{}", text(&last));
    assert_eq!(json_of(&last)?["removal"], "joined");
    assert_eq!(lab.companion_removevolumes()?, [202], "one removevolume for the four detaches");
    let vm = lab.object("VirtualMachine", "virtualmachines", "vm1").await?;
    assert!(!template_volumes(&vm).contains(&"data1".to_string()), "gone from the template: {vm}");
    assert!(!lab.guest.has_disk("data1").await, "the guest lost the disk");
    // KubeVirt as KubeVirt does it: virt-controller through the VMI's subresource, virt-api's patch as itself.
    let audit = lab.cluster.audit()?;
    assert!(audit.iter().any(|e| refused(e) && e.code() == 202), "virt-controller's VMI removevolume");
    let vmi_patch = |e: &&AuditEvent| {
        let ops = e.request_object.as_ref().and_then(|o| o.as_array().cloned()).unwrap_or_default();
        e.verb == "patch" && e.code() == 200 && ops.iter().any(|op| op["path"] == "/spec/volumes")
    };
    assert!(
        audit.iter().filter(vmi_patch).all(|e| e.user.username == API_SERVER),
        "virt-api patches the VMI as itself"
    );

    let dev = lab.attach_data1().await?;
    lab.guest.run_ok(&format!("mount {dev} /mnt/k")).await?;
    assert_eq!(lab.guest.checksum("/mnt/k/data").await?, sum, "data intact after the joined removal");
    Ok(())
}

/// Issue 14 through the real API server: a detach that timed out while KubeVirt was still unplugging is run again,
/// as a user or an operator's next reconcile does: it joins the removal (no second removevolume, no CancelDetach)
/// and the data survives. Then two detaches at once, and a removal KubeVirt really refuses, which still gives the
/// guest its disk back.
#[tokio::test(flavor = "multi_thread")]
async fn a_retried_detach_joins_kubevirts_removal_instead_of_giving_the_disk_back() -> Result<()> {
    let lab = lab(HotplugMode::Declarative).await?;
    let dev = lab.attach_data1().await?;
    let sum = lab.guest.fill(&dev, "/mnt/k", 4 << 20).await?;
    lab.kubevirt.set_unplug_delay(std::time::Duration::from_secs(4));

    // The first detach gives up while the attachment pod is still being torn down.
    let first = lab.ctl(&["-o", "json", "detach", "data1", "--unmount", "--timeout", "1"])?;
    assert_eq!(first.status.code(), Some(5), "{}", text(&first));
    let error = json_of(&first)?;
    assert_eq!(error["removal_in_progress"], true, "{error}");
    assert!(error["error"].as_str().unwrap_or_default().contains("Run detach again to wait for it"), "{error}");
    assert!(!text(&first).contains("cancel-release"), "no advice to take the disk back: {}", text(&first));
    assert_eq!(lab.removevolumes()?, 1);

    // The retry waits for that removal.
    let second = lab.ctl(&["-o", "json", "detach", "data1", "--unmount", "--timeout", "60"])?;
    assert_eq!(second.status.code(), Some(0), "{}", text(&second));
    assert_eq!(json_of(&second)?["removal"], "joined");
    assert_eq!(lab.removevolumes()?, 1, "no second removevolume");
    lab.assert_not_given_back().await?;
    let dev = lab.attach_data1().await?;
    lab.guest.run_ok(&format!("mount {dev} /mnt/k")).await?;
    assert_eq!(lab.guest.checksum("/mnt/k/data").await?, sum, "data intact after the retried detach");

    // A second detach starts while the first one is still waiting: both end well, one removevolume.
    lab.kubevirt.set_unplug_delay(std::time::Duration::from_secs(3));
    let waiting = lab.spawn_ctl(&["-o", "json", "detach", "data1", "--unmount", "--timeout", "60"])?;
    let started = std::time::Instant::now();
    while lab.removevolumes()? < 2 {
        anyhow::ensure!(started.elapsed().as_secs() < 60, "the first detach never sent its removevolume");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let joined = lab.ctl(&["-o", "json", "detach", "data1", "--unmount", "--timeout", "60"])?;
    let first = tokio::task::block_in_place(|| waiting.wait_with_output())?;
    assert_eq!(joined.status.code(), Some(0), "{}", text(&joined));
    assert_eq!(first.status.code(), Some(0), "{}", text(&first));
    assert_eq!(json_of(&joined)?["removal"], "joined");
    assert_eq!(json_of(&first)?["removal"], "requested");
    assert_eq!(lab.removevolumes()?, 2, "one removevolume for the two detaches");
    lab.assert_not_given_back().await?;

    // KubeVirt really refuses the removal and keeps the volume: the guest gets its disk back, mounted and intact.
    lab.kubevirt.set_unplug_delay(std::time::Duration::from_millis(150));
    let dev = lab.attach_data1().await?;
    lab.guest.run_ok(&format!("mount {dev} /mnt/k")).await?;
    lab.kubevirt.refuse_removals(Some("the attachment pod could not be deleted"));
    let refused = lab.ctl(&["detach", "data1", "--unmount", "--timeout", "60"])?;
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert!(text(&refused).contains("the guest got its disk back (CancelDetach)"), "{}", text(&refused));
    assert_eq!(lab.guest.checksum("/mnt/k/data").await?, sum, "mounted again and intact");
    lab.guest.run_ok("echo more >> /mnt/k/data && sync").await.context("the disk is writable again")?;
    Ok(())
}

/// Writes `marker` at the start of an image file, where the guest reads it back from the disk.
fn mark_image(image: &std::path::Path, marker: &str) -> Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new().write(true).open(image)?;
    file.write_all(marker.as_bytes())?;
    Ok(file.sync_all()?)
}

/// Issue 20: any change to a hot-plugged volume is an unplug (KubeVirt's `filterHotplugVMIVolumes`). The VM's
/// template gets another claim for data1: virt-controller drops the old volume from the VMI, the guest loses that
/// disk, and once its status entry is gone the new definition is plugged: the guest sees the other image under the
/// same serial.
#[tokio::test(flavor = "multi_thread")]
async fn another_claim_for_a_hotplugged_volume_unplugs_the_old_disk_and_plugs_the_new_one() -> Result<()> {
    let lab = lab(HotplugMode::Declarative).await?;
    mark_image(&lab.image, "old-disk")?;
    let other = lab.guest.new_image(16 << 20)?;
    mark_image(&other, "new-disk")?;
    lab.kubevirt.create_claim("pvc-b", &other).await?;
    let dev = lab.attach_data1().await?;
    assert_eq!(lab.guest.run_ok(&format!("head -c 8 {dev}")).await?, "old-disk");

    // kubectl edit or a GitOps sync changes the claim only: name, disk and serial stay.
    let admin = lab.cluster.client(ADMIN).await?;
    let vm = lab.object("VirtualMachine", "virtualmachines", "vm1").await?;
    let volumes = vm["spec"]["template"]["spec"]["volumes"].as_array().context("the VM's volumes")?;
    let index = volumes.iter().position(|v| v["name"] == "data1").context("data1 in the VM's spec")?;
    let path = format!("/spec/template/spec/volumes/{index}");
    let change = json!([{"op": "test", "path": format!("{path}/name"), "value": "data1"},
                        {"op": "replace", "path": format!("{path}/persistentVolumeClaim/claimName"), "value": "pvc-b"}]);
    let mark = lab.cluster.audit()?.len();
    let vms: Api<DynamicObject> =
        Api::namespaced_with(admin, NS, &dynamic("VirtualMachine", "kubevirt.io", "virtualmachines"));
    vms.patch(
        "vm1",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::<()>::Json(serde_json::from_value(change)?),
    )
    .await?;

    lab.guest.wait_unplugged("data1", std::time::Duration::from_secs(60)).await.context("the old disk stays")?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !lab.guest.has_disk("data1").await {
        anyhow::ensure!(std::time::Instant::now() < deadline, "the new claim of data1 was never plugged");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let dev = lab.guest.agent().get_disk("data1", false).await?.dev_node;
    assert_eq!(lab.guest.run_ok(&format!("head -c 8 {dev}")).await?, "new-disk", "the other image, as data1");

    // virt-controller's two VMI spec patches: the old definition out, then the new one in.
    let patches: Vec<Value> = lab
        .cluster
        .audit()?
        .into_iter()
        .skip(mark)
        .filter(|e| e.is_write() && e.code() == 200 && e.user.username == CONTROLLER)
        .filter(|e| e.object_ref.as_ref().is_some_and(|r| r.resource == "virtualmachineinstances"))
        .filter_map(|e| e.request_object)
        .flat_map(|ops| ops.as_array().cloned().unwrap_or_default())
        .filter(|op| op["op"] == "replace" && op["path"] == "/spec/volumes")
        .map(|op| {
            op["value"].as_array().and_then(|v| v.iter().find(|v| v["name"] == "data1").cloned()).unwrap_or(Value::Null)
        })
        .collect();
    let claims: Vec<&Value> = patches.iter().map(|v| &v["persistentVolumeClaim"]["claimName"]).collect();
    assert_eq!(claims, [&Value::Null, &json!("pvc-b")], "data1 dropped, then back with the new claim: {patches:?}");
    let vmi = lab.object("VirtualMachineInstance", "virtualmachineinstances", "vm1").await?;
    let statuses = vmi["status"]["volumeStatus"].as_array().cloned().unwrap_or_default();
    let status = statuses.iter().find(|s| s["name"] == "data1").context("data1's status")?;
    assert_eq!((&status["phase"], status["target"] != ""), (&json!("Ready"), true), "{status}");
    Ok(())
}

/// The VMI's status entry of `volume`, if it has one.
async fn volume_status(lab: &Lab, volume: &str) -> Result<Option<Value>> {
    let vmi = lab.object("VirtualMachineInstance", "virtualmachineinstances", "vm1").await?;
    Ok(vmi["status"]["volumeStatus"].as_array().and_then(|l| l.iter().find(|s| s["name"] == volume).cloned()))
}

/// The names of the claims' volumes each attachment Pod of vm1 holds (sorted; not its `hotplug-disks` directory),
/// oldest Pod first, with the Pods' names.
async fn pod_volumes(lab: &Lab) -> Result<Vec<(String, Vec<String>)>> {
    let pods = lab.kubevirt.attachment_pods("vm1").await?;
    Ok(pods
        .into_iter()
        .map(|p| {
            let volumes = p.data["spec"]["volumes"].as_array().cloned().unwrap_or_default();
            let claims = volumes.iter().filter(|v| v["persistentVolumeClaim"].is_object());
            let mut names: Vec<String> = claims.filter_map(|v| v["name"].as_str().map(str::to_string)).collect();
            names.sort();
            (p.metadata.name.unwrap_or_default(), names)
        })
        .collect())
}

/// Waits until vm1 has exactly one attachment Pod, holding `volumes` (sorted); returns its name.
async fn one_pod_holding(lab: &Lab, volumes: &[&str]) -> Result<String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let pods = pod_volumes(lab).await?;
        if let [(name, held)] = pods.as_slice()
            && held.iter().map(String::as_str).eq(volumes.iter().copied())
        {
            return Ok(name.clone());
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "attachment pods never settled on {volumes:?}: {pods:?}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Issue 29, item 3: KubeVirt's one attachment Pod per VMI. With data1 and data2 plugged, unplugging data1 ends only
/// when the Pod that holds data2 alone runs and the old one is deleted (`cleanupAttachmentPods`). A detach through a
/// slow, a stuck (ContainerCreating) and a never-scheduled replacement Pod gives up at its timeout naming the Pod
/// that holds the volume, a retry joins the removal, and a re-add of the same name waits for the entry to go.
#[tokio::test(flavor = "multi_thread")]
async fn a_detach_waits_for_the_attachment_pod_that_replaces_the_old_one() -> Result<()> {
    use std::time::{Duration, Instant};
    use wukong_e2e::kubevirt_lab::AttachmentPodFault;
    let lab = lab(HotplugMode::Declarative).await?;
    lab.kubevirt.create_claim("pvc-b", &lab.guest.new_image(16 << 20)?).await?;
    lab.attach_data1().await?;
    let first = one_pod_holding(&lab, &["data1"]).await?;
    let out = lab.ctl(&["attach", "data2", "--claim", "pvc-b", "--timeout", "90"])?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let both = one_pod_holding(&lab, &["data1", "data2"]).await?;
    assert_ne!(first, both, "plugging data2 replaced the Pod that held data1 alone");
    let status = volume_status(&lab, "data1").await?.context("data1's status")?;
    assert_eq!(status["hotplugVolume"]["attachPodName"], both.as_str(), "{status}");

    for fault in [None, Some(AttachmentPodFault::Stuck), Some(AttachmentPodFault::Unschedulable)] {
        let holder = one_pod_holding(&lab, &["data1", "data2"]).await?;
        lab.kubevirt.set_attachment_pod_start(Duration::from_secs(10));
        lab.kubevirt.set_attachment_pod_fault(fault);
        let out = lab.ctl(&["-o", "json", "detach", "data1", "--unmount", "--timeout", "3"])?;
        assert_eq!(out.status.code(), Some(5), "{fault:?}: {}", text(&out));
        let error = json_of(&out)?["error"].as_str().unwrap_or_default().to_string();
        assert!(error.contains(&format!("attachment pod {holder} is gone")), "{fault:?}: {error}");
        assert!(error.contains("Run detach again to wait for it"), "{fault:?}: {error}");
        // The guest lost the disk (virt-handler let go of it: Detaching), the old Pod stays, its replacement waits.
        let status = volume_status(&lab, "data1").await?.context("data1's entry stays")?;
        assert_eq!(
            (&status["phase"], &status["hotplugVolume"]["attachPodName"]),
            (&json!("Detaching"), &json!(holder))
        );
        let pods = lab.kubevirt.attachment_pods("vm1").await?;
        assert_eq!(pods.len(), 2, "{fault:?}: the old Pod and its replacement: {pods:?}");
        let replacement = &pods[1].data["status"];
        match fault {
            None => assert_ne!(replacement["phase"], "Running", "still starting: {replacement}"),
            Some(AttachmentPodFault::Stuck) => {
                assert_eq!(replacement["containerStatuses"][0]["state"]["waiting"]["reason"], "ContainerCreating")
            }
            Some(AttachmentPodFault::Unschedulable) => {
                assert_eq!(replacement["conditions"][0]["reason"], "Unschedulable", "{replacement}")
            }
        }
        // Adding data1 again waits for the old entry: nothing is sent while it lasts.
        let adds = lab.kubevirt.received().iter().filter(|r| r.path.ends_with("/addvolume")).count();
        let out = lab.ctl(&["attach", "data1", "--claim", "pvc-a", "--timeout", "2"])?;
        assert_ne!(out.status.code(), Some(0), "{}", text(&out));
        assert!(text(&out).contains("an earlier removal of it is still in phase Detaching"), "{}", text(&out));
        let now = lab.kubevirt.received().iter().filter(|r| r.path.ends_with("/addvolume")).count();
        assert_eq!(now, adds, "no addvolume while data1's old entry lasts");

        // The replacement runs: the old Pod goes, and with it the entry; a retried detach joins and ends.
        lab.kubevirt.set_attachment_pod_fault(None);
        let started = Instant::now();
        let out = lab.ctl(&["-o", "json", "detach", "data1", "--unmount", "--timeout", "60"])?;
        assert_eq!(out.status.code(), Some(0), "{fault:?}: {}", text(&out));
        assert!(volume_status(&lab, "data1").await?.is_none(), "the entry went with the old Pod");
        let kept = one_pod_holding(&lab, &["data2"]).await?;
        println!("{fault:?}: the retry ended in {:.1} s; {kept} holds data2", started.elapsed().as_secs_f64());
        lab.kubevirt.set_attachment_pod_start(Duration::from_millis(150));
        lab.attach_data1().await?;
    }
    lab.assert_not_given_back().await?;
    Ok(())
}

/// Issue 29, item 4: a hot-plugged volume whose claim does not exist (a typo'd --claim) stops every hot-plug and
/// unplug of the VMI in KubeVirt (`handleHotplugVolumes` returns at it): data1's unplug never ends, though the guest
/// released and lost the disk. The detach says which volume and claim stall it; once that volume goes, it ends.
#[tokio::test(flavor = "multi_thread")]
async fn a_missing_claim_beside_a_detaching_volume_is_named() -> Result<()> {
    let lab = lab(HotplugMode::Declarative).await?;
    lab.kubevirt.create_claim("pvc-b", &lab.guest.new_image(16 << 20)?).await?;
    lab.attach_data1().await?;
    let out = lab.ctl(&["attach", "data2", "--claim", "pvc-b", "--timeout", "90"])?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let holder = one_pod_holding(&lab, &["data1", "data2"]).await?;
    let out = lab.ctl(&["attach", "typo", "--claim", "pvc-nope", "--timeout", "2"])?;
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));

    let out = lab.ctl(&["-o", "json", "detach", "data1", "--unmount", "--timeout", "5"])?;
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    let error = json_of(&out)?["error"].as_str().unwrap_or_default().to_string();
    assert!(error.contains("volume 'typo' names claim 'pvc-nope', which does not exist"), "{error}");
    let status = volume_status(&lab, "data1").await?.context("data1's entry stays")?;
    assert_eq!(status["phase"], "Detaching", "the guest let go of data1: {status}");
    let pods = pod_volumes(&lab).await?;
    assert_eq!(pods, [(holder, vec!["data1".to_string(), "data2".to_string()])], "frozen: no replacement Pod");

    let out = lab.ctl(&["detach", "typo", "--force", "--timeout", "60"])?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = lab.ctl(&["-o", "json", "detach", "data1", "--unmount", "--timeout", "60"])?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(volume_status(&lab, "data1").await?.is_none(), "data1's entry is gone");
    one_pod_holding(&lab, &["data2"]).await?;
    Ok(())
}

/// Issue 29, item 6: virt-launcher's unplug fails in the guest's domain: the guest never acknowledges it, or libvirt
/// refuses it. The volume's status stays Ready, virt-handler records `SyncFailed` Warning events, and a detach gives
/// up at its timeout saying the domain still has the disk and where KubeVirt says why; once the unplug goes through,
/// a retry joins it and ends.
#[tokio::test(flavor = "multi_thread")]
async fn an_unplug_that_fails_in_the_domain_is_reported_with_kubevirts_sync_failures() -> Result<()> {
    use wukong_e2e::kubevirt_lab::UnplugFailure;
    let lab = lab(HotplugMode::Declarative).await?;
    let refused =
        "internal error: unable to execute QEMU command 'device_del': Bus 'scsi0.0' does not support hotplugging";
    let failures = [
        (UnplugFailure::NeverAcknowledged, "Device ua-data1 is already in the process of unplug"),
        (UnplugFailure::Libvirt(refused.into()), refused),
    ];
    for (failure, says) in failures {
        lab.attach_data1().await?;
        lab.kubevirt.set_unplug_failure(Some(failure.clone()));
        let out = lab.ctl(&["-o", "json", "detach", "data1", "--unmount", "--timeout", "4"])?;
        assert_eq!(out.status.code(), Some(5), "{failure:?}: {}", text(&out));
        let error = json_of(&out)?["error"].as_str().unwrap_or_default().to_string();
        assert!(error.contains("in phase Ready"), "{failure:?}: {error}");
        assert!(error.contains("the guest's domain still has the disk"), "{failure:?}: {error}");
        assert!(error.contains("SyncFailed"), "{failure:?}: {error}");
        let status = volume_status(&lab, "data1").await?.context("data1's entry")?;
        assert_eq!(status["phase"], "Ready", "{failure:?}: {status}");
        let events: Api<DynamicObject> =
            Api::namespaced_with(lab.cluster.client(ADMIN).await?, NS, &dynamic("Event", "", "events"));
        let warnings: Vec<String> = events
            .list(&Default::default())
            .await?
            .into_iter()
            .filter(|e| e.data["type"] == "Warning" && e.data["reason"] == "SyncFailed")
            .filter_map(|e| e.data["message"].as_str().map(str::to_string))
            .collect();
        assert!(warnings.iter().any(|m| m.contains(says)), "{failure:?}: {warnings:#?}");

        lab.kubevirt.set_unplug_failure(None);
        let out = lab.ctl(&["-o", "json", "detach", "data1", "--unmount", "--timeout", "60"])?;
        assert_eq!(out.status.code(), Some(0), "{failure:?}: {}", text(&out));
        assert_eq!(json_of(&out)?["removal"], "joined");
    }
    lab.assert_not_given_back().await?;
    Ok(())
}

/// PUTs `body` to subresource `verb` of `plural`/`name` in `ns` through the aggregated API: a refusal's code and
/// message.
async fn subresource(
    client: &kube::Client,
    ns: &str,
    plural: &str,
    name: &str,
    verb: &str,
    body: Value,
) -> Result<Result<(), (u16, String)>> {
    let path = format!("/apis/subresources.kubevirt.io/v1/namespaces/{ns}/{plural}/{name}/{verb}");
    let request =
        http::Request::put(path).header("content-type", "application/json").body(serde_json::to_vec(&body)?)?;
    match client.request_text(request).await {
        Ok(_) => Ok(Ok(())),
        Err(kube::Error::Api(s)) => Ok(Err((s.code, s.message))),
        Err(e) => Err(e.into()),
    }
}

fn add_options(name: &str, claim: &str, bus: &str) -> Value {
    json!({"name": name, "disk": {"name": name, "serial": name, "disk": {"bus": bus}},
           "volumeSource": {"persistentVolumeClaim": {"claimName": claim}}})
}

/// Issue 29, item 9: virt-api v1.9.0's subresource rules (pkg/virt-api/rest/volumes.go) as the lab plays them: a
/// claim in use by another volume, a removal by claim name, a dry run that reaches the PATCH, a bad bus that is
/// accepted and never attaches, and the owner checked before the phase.
#[tokio::test(flavor = "multi_thread")]
async fn virt_api_answers_volume_requests_as_kubevirt_does() -> Result<()> {
    let lab = lab(HotplugMode::Declarative).await?;
    lab.attach_data1().await?;
    let admin = lab.cluster.client(ADMIN).await?;
    let vm1 = |verb: &'static str, body: Value| subresource(&admin, NS, "virtualmachines", "vm1", verb, body);

    // `verifyVolumeOption`: another volume already has that claim.
    let in_use = "Unable to add volume source [pvc-a] because it already exists";
    let refused = vm1("addvolume", add_options("data2", "pvc-a", "scsi")).await?;
    let message = format!("Operation cannot be fulfilled on virtualmachine.kubevirt.io \"vm1\": {in_use}");
    assert_eq!(refused, Err((409, message)));
    let out = lab.ctl(&["attach", "data2", "--claim", "pvc-a", "--timeout", "30"])?;
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains(in_use), "wukongctl passes KubeVirt's reason on: {}", text(&out));

    // A removal by claim name finds the volume (`volumeExists`) but removes by name (`ApplyVolumeRequestOnVMISpec`):
    // accepted, and nothing changes.
    let before = lab.object("VirtualMachine", "virtualmachines", "vm1").await?;
    assert_eq!(vm1("removevolume", json!({"name": "pvc-a"})).await?, Ok(()));
    let after = lab.object("VirtualMachine", "virtualmachines", "vm1").await?;
    assert_eq!(after["spec"], before["spec"], "a removal by claim name changes nothing");
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert!(lab.guest.has_disk("data1").await, "the guest keeps data1");

    // A dry run is virt-api's PATCH with dryRun=All (`getDryRunOption`): every webhook reviews it, nothing is
    // stored.
    let mark = lab.cluster.audit()?.len();
    assert_eq!(vm1("removevolume", json!({"name": "data1", "dryRun": ["All"]})).await?, Ok(()));
    let dry = lab.cluster.audit()?.into_iter().skip(mark).find(|e| {
        e.is_write() && e.verb == "patch" && e.object_ref.as_ref().is_some_and(|r| r.resource == "virtualmachines")
    });
    let dry = dry.context("a dry run reaches the API server as virt-api's PATCH of the VM")?;
    assert!(dry.request_uri.contains("dryRun=All") && dry.code() == 200, "{dry:?}");
    let vm = lab.object("VirtualMachine", "virtualmachines", "vm1").await?;
    assert!(template_volumes(&vm).contains(&"data1".to_string()), "a dry run stores nothing: {vm}");

    // The owner is checked before the phase (`vmiVolumePatch`). The lab's KubeVirt runs nothing in namespace
    // `idle`: its VMIs never run.
    let namespace = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "idle"}});
    wukong_e2e::cluster::create_all(&admin, vec![namespace]).await?;
    let vms: Api<DynamicObject> =
        Api::namespaced_with(admin.clone(), "idle", &dynamic("VirtualMachine", "kubevirt.io", "virtualmachines"));
    let vm = json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": "held"},
                    "spec": {"running": false, "template": {"spec": {"domain": {"devices": {}}}}}});
    let uid = vms.create(&PostParams::default(), &serde_json::from_value(vm)?).await?.metadata.uid;
    let vmis: Api<DynamicObject> = Api::namespaced_with(
        admin.clone(),
        "idle",
        &dynamic("VirtualMachineInstance", "kubevirt.io", "virtualmachineinstances"),
    );
    for (name, owners) in [
        (
            "held",
            json!([{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "name": "held", "uid": uid,
                         "controller": true}]),
        ),
        ("loose", json!([])),
    ] {
        let vmi = json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
                         "metadata": {"name": name, "ownerReferences": owners}, "spec": {"domain": {"devices": {}}}});
        vmis.create(&PostParams::default(), &serde_json::from_value(vmi)?).await?;
    }
    let vmi = |name: &'static str| {
        subresource(&admin, "idle", "virtualmachineinstances", name, "addvolume", add_options("x", "pvc-x", "scsi"))
    };
    assert_eq!(vmi("held").await?, Err((400, "VMI idle/held is owned by a VM".into())));
    let not_running =
        "Operation cannot be fulfilled on virtualmachineinstance.kubevirt.io \"loose\": VMI is not running";
    assert_eq!(vmi("loose").await?, Err((409, not_running.into())));

    // A bus KubeVirt cannot hot-plug, with declarative hot-plug: the VM admitter takes it into the VM's spec; the VMI
    // admitter refuses virt-controller's patch of the VMI every time (`ValidateHotplugDiskConfiguration`): it never
    // attaches.
    lab.kubevirt.create_claim("pvc-c", &lab.guest.new_image(16 << 20)?).await?;
    let mark = lab.cluster.audit()?.len();
    assert_eq!(vm1("addvolume", add_options("data3", "pvc-c", "sata")).await?, Ok(()));
    let vm = lab.object("VirtualMachine", "virtualmachines", "vm1").await?;
    assert!(template_volumes(&vm).contains(&"data3".to_string()), "accepted into the VM's spec: {vm}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let refused = loop {
        let refused = lab.cluster.audit()?.into_iter().skip(mark).find(|e| {
            let vmi = e.object_ref.as_ref().is_some_and(|r| r.resource == "virtualmachineinstances");
            vmi && e.is_write() && e.user.username == CONTROLLER && e.code() == 422
        });
        if let Some(refused) = refused {
            break refused;
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "virt-controller's patch of the VMI was never refused");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    // The audit log keeps no message: the same patch, sent again as virt-controller, says why.
    let patch: json_patch::Patch = serde_json::from_value(refused.request_object.context("the refused patch")?)?;
    let as_controller: Api<DynamicObject> = Api::namespaced_with(
        lab.cluster.client(CONTROLLER).await?,
        NS,
        &dynamic("VirtualMachineInstance", "kubevirt.io", "virtualmachineinstances"),
    );
    let bus = "Hotplug configuration for disk [data3] requires bus to be 'scsi' or 'virtio'. [sata] is not permitted.";
    match as_controller.patch("vm1", &kube::api::PatchParams::default(), &kube::api::Patch::<()>::Json(patch)).await {
        Err(kube::Error::Api(s)) => assert!(s.code == 422 && s.message.ends_with(bus), "{s:?}"),
        other => panic!("KubeVirt's VMI admitter must refuse the bad bus: {other:?}"),
    }
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let vmi = lab.object("VirtualMachineInstance", "virtualmachineinstances", "vm1").await?;
    let in_vmi = |key: &str| vmi[key].to_string().contains("data3");
    assert!(!in_vmi("spec") && !in_vmi("status"), "data3 never reaches the VMI: {vmi}");
    assert!(!lab.guest.has_disk("data3").await, "the guest never gets data3");
    Ok(())
}

/// The core Events of VMI `vmi` in NS: (reason, message, source component), oldest first.
async fn vmi_events(lab: &Lab, vmi: &str) -> Result<Vec<(String, String, String)>> {
    let events: Api<DynamicObject> =
        Api::namespaced_with(lab.cluster.client(ADMIN).await?, NS, &dynamic("Event", "", "events"));
    let field = |e: &DynamicObject, path: &[&str]| {
        path.iter().fold(&e.data, |v, k| &v[k]).as_str().unwrap_or_default().to_string()
    };
    Ok(events
        .list(&Default::default())
        .await?
        .into_iter()
        .filter(|e| e.data["involvedObject"]["name"] == vmi)
        .map(|e| (field(&e, &["reason"]), field(&e, &["message"]), field(&e, &["source", "component"])))
        .collect())
}

/// Issue 29, items 5 and 10. The lab records the Events KubeVirt v1.9 records for a hot-plug and an unplug
/// (virt-controller's attachment Pod created and deleted, virt-handler's phase changes) and never `VolumeUnplugged`,
/// which virt-handler emits only for a status entry it drops itself, which it never does; nothing of ours waits for
/// it. A VMI with `disableHotplug` has no hot-plug directory in its virt-launcher Pod: a volume plugged into its VM's
/// template stays AttachedToNode with `SyncFailed` events (the lab as KubeVirt), and the companion refuses to attach
/// there at all, changing nothing, instead of waiting for a disk that never comes.
#[tokio::test(flavor = "multi_thread")]
async fn the_lab_records_kubevirts_events_and_a_vmi_without_hotplug_gets_nothing() -> Result<()> {
    let lab = lab(HotplugMode::Declarative).await?;
    lab.attach_data1().await?;
    let out = lab.ctl(&["-o", "json", "detach", "data1", "--timeout", "60"])?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // The attachment Pod is deleted once the volume is unmounted from virt-launcher: wait for that Event.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let events = loop {
        let events = vmi_events(&lab, "vm1").await?;
        if events.iter().any(|(reason, ..)| reason == "SuccessfulDelete") {
            break events;
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "no SuccessfulDelete: {events:#?}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    let has = |reason: &str, message: &str, component: &str| {
        events.iter().any(|(r, m, c)| r == reason && m.starts_with(message) && c == component)
    };
    assert!(has("SuccessfulCreate", "Created attachment pod hp-volume-", "virtualmachine-controller"), "{events:#?}");
    assert!(has("VolumeMountedToPod", "Volume data1 has been mounted in virt-launcher pod", "virt-handler"));
    assert!(has("VolumeReady", "Successfully attach hotplugged volume data1 to VM", "virt-handler"));
    assert!(has("VolumeUnMountedFromPod", "Volume data1 has been unmounted from virt-launcher pod", "virt-handler"));
    assert!(has("SuccessfulDelete", "Deleted attachment pod hp-volume-", "virtualmachine-controller"));
    assert!(!events.iter().any(|(r, ..)| r == "VolumeUnplugged"), "{events:#?}");

    // disableHotplug: the companion refuses before anything changes.
    lab.kubevirt.create_vm_without_hotplug("vm2", "10.0.2.15").await?;
    lab.kubevirt.create_claim("pvc-b", &lab.guest.new_image(16 << 20)?).await?;
    let received = lab.kubevirt.received().len();
    let out =
        lab.ctl_on(COMPANION, "vm2", &["-o", "json", "attach", "data2", "--claim", "pvc-b", "--timeout", "20"])?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let error = json_of(&out)?["error"].as_str().unwrap_or_default().to_string();
    assert!(error.contains("VMI ns1/vm2 has spec.domain.devices.disableHotplug: true"), "{error}");
    assert!(error.contains("nothing was changed"), "{error}");
    assert_eq!(lab.kubevirt.received().len(), received, "no addvolume was sent");
    let vm2 = lab.object("VirtualMachine", "virtualmachines", "vm2").await?;
    assert!(!template_volumes(&vm2).contains(&"data2".to_string()), "{vm2}");

    // The lab as KubeVirt: a volume someone else puts into the template reaches the VMI and an attachment Pod, but
    // never the guest.
    let vms: Api<DynamicObject> = Api::namespaced_with(
        lab.cluster.client(ADMIN).await?,
        NS,
        &dynamic("VirtualMachine", "kubevirt.io", "virtualmachines"),
    );
    let add = json!([
        {"op": "add", "path": "/spec/template/spec/volumes/-",
         "value": {"name": "data2", "persistentVolumeClaim": {"claimName": "pvc-b", "hotpluggable": true}}},
        {"op": "add", "path": "/spec/template/spec/domain/devices/disks/-",
         "value": {"name": "data2", "serial": "data2", "disk": {"bus": "scsi"}}},
    ]);
    let patch: json_patch::Patch = serde_json::from_value(add)?;
    vms.patch("vm2", &Default::default(), &kube::api::Patch::<()>::Json(patch)).await?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let failure = loop {
        let events = vmi_events(&lab, "vm2").await?;
        if let Some((_, message, _)) = events.iter().find(|(r, ..)| r == "SyncFailed") {
            break message.clone();
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "no SyncFailed for vm2: {events:#?}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert!(failure.contains("failed to mount filesystem hotplug volume data2"), "{failure}");
    assert!(failure.contains("hotplug-disks: no such file or directory"), "{failure}");
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let vmi = lab.object("VirtualMachineInstance", "virtualmachineinstances", "vm2").await?;
    let status = vmi["status"]["volumeStatus"].as_array().and_then(|l| l.iter().find(|s| s["name"] == "data2"));
    assert_eq!(status.map(|s| s["phase"].clone()), Some(json!("AttachedToNode")), "{vmi}");
    assert!(!lab.guest.has_disk("data2").await, "nothing reaches the guest");
    Ok(())
}
