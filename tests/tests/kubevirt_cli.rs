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

    let out = ctl(&guest, &api, &["-o", "json", "attach", "Data1", "--claim", "pvc-a", "--timeout", "60"])?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let attached: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(attached["disk"]["serial"], "data1", "the serial is derived from the volume name, lowercased");
    let add = api.seen().into_iter().find(|s| s.path.ends_with("/addvolume")).context("an addvolume request")?;
    assert_eq!(add.method, "PUT");
    assert_eq!(add.path, "/apis/subresources.kubevirt.io/v1/namespaces/ns1/virtualmachineinstances/vm1/addvolume");
    assert_eq!(
        add.body,
        Some(json!({"name": "Data1", "disk": {"name": "Data1", "serial": "data1", "disk": {"bus": "scsi"}},
                    "volumeSource": {"persistentVolumeClaim": {"claimName": "pvc-a", "hotpluggable": true}}}))
    );
    let dev = attached["disk"]["dev_node"].as_str().unwrap().to_string();
    let sum = guest.fill(&dev, "/mnt/k", 4 << 20).await?;

    let refused = ctl(&guest, &api, &["detach", "Data1"])?;
    assert_eq!(refused.status.code(), Some(3), "{}", text(&refused));
    assert!(text(&refused).contains("/mnt/k (ext4)"), "{}", text(&refused));
    assert_eq!(removevolumes(&api), 0, "refused: no removevolume reached KubeVirt");

    let out = ctl(&guest, &api, &["detach", "Data1", "--unmount", "--timeout", "60"])?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(removevolumes(&api), 1);
    let remove = api.seen().into_iter().find(|s| s.path.ends_with("/removevolume")).unwrap();
    assert_eq!(remove.body, Some(json!({"name": "Data1"})));

    let out = ctl(&guest, &api, &["-o", "json", "attach", "Data1", "--claim", "pvc-a", "--timeout", "60"])?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let again: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let dev = again["disk"]["dev_node"].as_str().unwrap();
    guest.run_ok(&format!("mount {dev} /mnt/k")).await?;
    assert_eq!(guest.checksum("/mnt/k/data").await?, sum, "data intact after detach and re-attach");
    Ok(())
}
