//! `wukongctl --vmi ns/name attach|detach` end to end: kube-rs and HTTP to a server that speaks KubeVirt's hot-plug
//! API as documented (paths, bodies, 202, volume phases over time) and hot-plugs for real into the lab guest.

use anyhow::{Context, Result};
use serde_json::json;
use std::process::Output;
use wukong_e2e::Guest;
use wukong_e2e::kubevirt_api::KubeVirtApi;

fn ctl(guest: &Guest, api: &KubeVirtApi, args: &[&str]) -> Result<Output> {
    std::process::Command::new(wukong_e2e::wukongctl_binary())
        .env("KUBECONFIG", api.kubeconfig())
        .args(["--vmi", "ns1/vm1", "--agent", &guest.agent_address().to_string()])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .context("running wukongctl")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn removevolumes(api: &KubeVirtApi) -> usize {
    api.seen().iter().filter(|s| s.path.ends_with("/removevolume")).count()
}

#[tokio::test(flavor = "multi_thread")]
async fn wukongctl_vmi_attach_and_detach_through_the_kubevirt_api() -> Result<()> {
    let guest = Guest::boot().await?;
    let image = guest.new_image(64 << 20)?;
    let api = KubeVirtApi::start(&guest, "ns1", "vm1", &[("pvc-a", image.as_path())]).await?;

    let out = ctl(&guest, &api, &["-o", "json", "attach", "data1", "--claim", "pvc-a", "--timeout", "60"])?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let attached: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(attached["disk"]["serial"], "data1", "the serial is the volume name, as virtctl gives it");
    let add = api.seen().into_iter().find(|s| s.path.ends_with("/addvolume")).context("an addvolume request")?;
    assert_eq!(add.method, "PUT");
    assert_eq!(add.path, "/apis/subresources.kubevirt.io/v1/namespaces/ns1/virtualmachineinstances/vm1/addvolume");
    assert_eq!(
        add.body,
        Some(json!({"name": "data1", "disk": {"name": "data1", "serial": "data1", "disk": {"bus": "scsi"}},
                    "volumeSource": {"persistentVolumeClaim": {"claimName": "pvc-a", "hotpluggable": true}}}))
    );
    let dev = attached["disk"]["dev_node"].as_str().unwrap().to_string();
    let sum = guest.fill(&dev, "/mnt/k", 4 << 20).await?;

    let refused = ctl(&guest, &api, &["detach", "data1"])?;
    assert_eq!(refused.status.code(), Some(3), "{}", text(&refused));
    assert!(text(&refused).contains("/mnt/k (ext4)"), "{}", text(&refused));
    assert_eq!(removevolumes(&api), 0, "refused: no removevolume reached KubeVirt");

    let out = ctl(&guest, &api, &["detach", "data1", "--unmount", "--timeout", "60"])?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(removevolumes(&api), 1);
    let remove = api.seen().into_iter().find(|s| s.path.ends_with("/removevolume")).unwrap();
    assert_eq!(remove.body, Some(json!({"name": "data1"})));

    let out = ctl(&guest, &api, &["-o", "json", "attach", "data1", "--claim", "pvc-a", "--timeout", "60"])?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let again: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let dev = again["disk"]["dev_node"].as_str().unwrap();
    guest.run_ok(&format!("mount {dev} /mnt/k")).await?;
    assert_eq!(guest.checksum("/mnt/k/data").await?, sum, "data intact after detach and re-attach");
    Ok(())
}

/// Runs wukongctl in the background (a detach still waiting while another starts).
fn spawn_ctl(guest: &Guest, api: &KubeVirtApi, args: &[&str]) -> Result<std::process::Child> {
    std::process::Command::new(wukong_e2e::wukongctl_binary())
        .env("KUBECONFIG", api.kubeconfig())
        .args(["--vmi", "ns1/vm1", "--agent", &guest.agent_address().to_string()])
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running wukongctl")
}

fn json_of(out: &Output) -> Result<serde_json::Value> {
    serde_json::from_slice(&out.stdout).with_context(|| format!("JSON from wukongctl: {}", text(out)))
}

async fn attach_data1(guest: &Guest, api: &KubeVirtApi) -> Result<String> {
    let out = ctl(guest, api, &["-o", "json", "attach", "data1", "--claim", "pvc-a", "--timeout", "60"])?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    Ok(json_of(&out)?["disk"]["dev_node"].as_str().context("the guest's device")?.to_string())
}

/// The guest must never get the disk back while KubeVirt unplugs it: no CancelDetach, so no rescan and no remount.
async fn assert_not_given_back(guest: &Guest) -> Result<()> {
    guest.run_ok("! grep -q ' /mnt/k ' /proc/mounts").await.context("the released disk was mounted again")?;
    Ok(())
}

/// A detach that timed out while KubeVirt was still unplugging is run again, as a user or an operator's next
/// reconcile does: it joins the removal (no second removevolume, no CancelDetach) and the data survives. Then two
/// detaches at once, and a removal KubeVirt really refuses, which still gives the guest its disk back.
#[tokio::test(flavor = "multi_thread")]
async fn a_retried_detach_joins_kubevirts_removal_instead_of_giving_the_disk_back() -> Result<()> {
    let guest = Guest::boot().await?;
    let image = guest.new_image(64 << 20)?;
    let api = KubeVirtApi::start(&guest, "ns1", "vm1", &[("pvc-a", image.as_path())]).await?;
    let dev = attach_data1(&guest, &api).await?;
    let sum = guest.fill(&dev, "/mnt/k", 4 << 20).await?;
    api.set_unplug_delay(std::time::Duration::from_secs(4));

    // The first detach gives up while the attachment pod is still being torn down.
    let first = ctl(&guest, &api, &["-o", "json", "detach", "data1", "--unmount", "--timeout", "1"])?;
    assert_eq!(first.status.code(), Some(5), "{}", text(&first));
    let error = json_of(&first)?;
    assert_eq!(error["removal_in_progress"], true, "{error}");
    assert_eq!(error["exit_code"], 5);
    let message = error["error"].as_str().unwrap_or_default();
    assert!(message.contains("Run detach again to wait for it"), "{message}");
    assert!(!text(&first).contains("cancel-release"), "no advice to take the disk back: {}", text(&first));
    assert_eq!(removevolumes(&api), 1);

    // The retry waits for that removal.
    let second = ctl(&guest, &api, &["-o", "json", "detach", "data1", "--unmount", "--timeout", "60"])?;
    assert_eq!(second.status.code(), Some(0), "{}", text(&second));
    assert_eq!(json_of(&second)?["removal"], "joined");
    assert_eq!(removevolumes(&api), 1, "no second removevolume");
    assert_not_given_back(&guest).await?;
    let dev = attach_data1(&guest, &api).await?;
    guest.run_ok(&format!("mount {dev} /mnt/k")).await?;
    assert_eq!(guest.checksum("/mnt/k/data").await?, sum, "data intact after the retried detach");

    // A second detach starts while the first one is still waiting: both end well, one removevolume.
    api.set_unplug_delay(std::time::Duration::from_secs(3));
    let waiting = spawn_ctl(&guest, &api, &["-o", "json", "detach", "data1", "--unmount", "--timeout", "60"])?;
    let started = std::time::Instant::now();
    while removevolumes(&api) < 2 {
        anyhow::ensure!(started.elapsed().as_secs() < 60, "the first detach never sent its removevolume");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let joined = ctl(&guest, &api, &["-o", "json", "detach", "data1", "--unmount", "--timeout", "60"])?;
    let first = waiting.wait_with_output()?;
    assert_eq!(joined.status.code(), Some(0), "{}", text(&joined));
    assert_eq!(first.status.code(), Some(0), "{}", text(&first));
    assert_eq!(json_of(&joined)?["removal"], "joined");
    assert_eq!(json_of(&first)?["removal"], "requested");
    assert_eq!(removevolumes(&api), 2, "one removevolume for the two detaches");
    assert_not_given_back(&guest).await?;

    // KubeVirt really refuses the removal and keeps the volume in the spec: the guest gets its disk back, mounted
    // and intact.
    api.set_unplug_delay(std::time::Duration::from_millis(150));
    let dev = attach_data1(&guest, &api).await?;
    guest.run_ok(&format!("mount {dev} /mnt/k")).await?;
    api.refuse_removals(Some("the attachment pod could not be deleted"));
    let refused = ctl(&guest, &api, &["detach", "data1", "--unmount", "--timeout", "60"])?;
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert!(text(&refused).contains("the guest got its disk back (CancelDetach)"), "{}", text(&refused));
    assert_eq!(guest.checksum("/mnt/k/data").await?, sum, "mounted again and intact");
    guest.run_ok("echo more >> /mnt/k/data && sync").await.context("the disk is writable again")?;
    Ok(())
}
