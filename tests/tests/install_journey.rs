//! The README's install section, run as written on the lab's node: each block a user copies (marked `<!-- run: NAME
//! -->` in the README) runs in bash with the lab's real kubectl and helm, and the workspace's wukongctl, against the
//! genuine API server; the test changes only the settings block (the lab's VM and the file server its guest
//! downloads the agent's .deb from) and adds what a cluster already has (the operator's image on the node, KubeVirt). What
//! KubeVirt does with the VM's `cloudInitNoCloud` Secret the lab does too: the guest boots from that Secret's user
//! data on a NoCloud disk, so the agent in it is installed exactly as the README makes it. Then the README's
//! uninstall runs, and must leave the guest's disk plugged with its data, its claim kept, and no finalizer
//! hanging.

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Secret};
use kube::api::{Api, DynamicObject};
use std::time::{Duration, Instant};
use wukong_e2e::cluster::ADMIN;
use wukong_e2e::kubevirt_lab::{API_SERVER, CONTROLLER, HANDLER, HotplugMode, KubeVirtLab, resource};
use wukong_e2e::node::{NODE_ADDRESS, Node, wait_for_pods};
use wukong_e2e::operator_lab::build_operator_image;
use wukong_e2e::readme_install::ReadmeShell;
use wukong_e2e::{FileServer, Guest, agent_packages, nocloud_seed};
use wukong_operator::crd::{Phase, Wukong};

const NS: &str = "shop";
const VM: &str = "shop-vm";
/// The repository the shipped Deployment names, which the node has no registry for: the image is imported.
const IMAGE: &str = "ghcr.io/wukong-disk-agent/wukong-operator";

fn sha256(path: &std::path::Path) -> Result<String> {
    let out = std::process::Command::new("sha256sum").arg(path).output()?;
    Ok(String::from_utf8(out.stdout)?.split_whitespace().next().context("sha256sum printed nothing")?.to_string())
}

async fn wait_until<T, F: std::future::Future<Output = Result<Option<T>>>>(
    what: &str,
    seconds: u64,
    mut probe: impl FnMut() -> F,
) -> Result<T> {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    loop {
        if let Some(found) = probe().await? {
            return Ok(found);
        }
        ensure!(Instant::now() < deadline, "{what} within {seconds} s");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_readmes_install_runs_as_written_on_a_node_and_its_uninstall_keeps_every_disk() -> Result<()> {
    // Built by scripts/test.sh before the tests: this only checks the script's inputs.
    let archive = build_operator_image(None)?;
    let node = Node::start(&[API_SERVER, CONTROLLER, HANDLER]).await?;
    node.import_image_as(&archive, IMAGE)?;
    let admin = node.client(ADMIN).await?;
    // The README's install assumes KubeVirt in the cluster, and the VM's namespace.
    wukong_e2e::kubevirt_crds::install(&admin).await?;
    let namespace = serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}});
    wukong_e2e::cluster::apply(&admin, &namespace).await?;
    let work = tempfile::tempdir()?;
    let (deb, _) = agent_packages(work.path(), env!("CARGO_PKG_VERSION"))?;
    let files = FileServer::start(&[&deb]).await?;
    let deb_name = deb.file_name().and_then(|n| n.to_str()).context("the package's name")?;
    let kubeconfig = node.cluster().kubeconfig(ADMIN)?;
    let settings = [
        ("VM_NAMESPACE", NS.to_string()),
        ("VM", VM.to_string()),
        ("AGENT_DEB_URL", format!("http://10.0.2.2:{}/{deb_name}", files.port)),
        ("AGENT_SHA256", sha256(&deb)?),
    ];
    let shell = ReadmeShell::new(work.path(), &kubeconfig, &settings)?;
    let started = Instant::now();
    println!("{}", shell.run("operator")?);
    println!("{}", shell.run("agent")?);

    // KubeVirt puts the Secret's userdata on the VM's NoCloud disk; the lab boots its guest from the same.
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), NS);
    let secret = secrets.get(&format!("{VM}-cloudinit")).await.context("the README's cloud-init Secret")?;
    let userdata = secret.data.and_then(|d| d.get("userdata").cloned()).context("the Secret's userdata key")?;
    let seed = nocloud_seed(work.path(), std::str::from_utf8(&userdata.0)?)?;
    let guest = Guest::boot_systemd(&seed).await?;
    let status = guest.run("cloud-init status --wait --long").await?;
    ensure!(status.output.contains("status: done"), "cloud-init did not finish cleanly:\n{}", status.output);
    assert_eq!(guest.run_ok("systemctl is-active wukong-agent.service").await?.trim(), "active");
    guest.forward_agent(NODE_ADDRESS).await?;
    let kubevirt = KubeVirtLab::start(node.cluster(), Some(&guest), NS, HotplugMode::Declarative).await?;
    let images = tempfile::tempdir()?;
    kubevirt.provision(images.path(), "lab-images").await?;
    let selector = "app.kubernetes.io/name=wukong-operator";
    wait_for_pods(&admin, "wukong-system", selector, 2, Duration::from_secs(180)).await?;
    println!("README install → both replicas Ready in {:.1} s", started.elapsed().as_secs_f64());
    kubevirt.create_vm(VM, true, &NODE_ADDRESS.to_string()).await?;

    // A Wukong gaining a disk, as the README writes it; its kubectl waits for Ready and shows the object.
    let shown = shell.run("wukong")?;
    println!("{shown}");
    ensure!(shown.contains(VM), "kubectl get shows the Wukong's VM:\n{shown}");
    let api: Api<Wukong> = Api::namespaced(admin.clone(), NS);
    let w = api.get(VM).await?;
    let status = w.status.context("status")?;
    let data = status.volumes.iter().find(|v| !v.system).context("a data disk in status")?;
    assert_eq!(data.phase, Phase::Attached, "{data:?}");
    let dev = data.device.clone().context("the guest's device")?;
    let claim = data.pvc_name.clone();
    let sum = guest.fill(&dev, "/mnt/data", 1 << 20).await?;
    guest.run_ok("umount /mnt/data").await?;

    // The README's uninstall: nothing hangs, and the guest keeps its disk and data, the claim kept.
    println!("{}", shell.run("uninstall")?);
    let crds: Api<DynamicObject> = Api::all_with(
        admin.clone(),
        &resource("CustomResourceDefinition", "apiextensions.k8s.io", "v1", "customresourcedefinitions"),
    );
    ensure!(crds.get_opt("wukongs.vm.novasphere.dev").await?.is_none(), "the Wukong CRD is gone");
    let hooks = wukong_e2e::operator_lab::webhook_configurations(&admin);
    ensure!(hooks.get_opt("wukong-guard").await?.is_none(), "the guard's webhook configuration is gone");
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(admin.clone());
    wait_until("the namespace wukong-system is gone", 120, || async {
        Ok(namespaces.get_opt("wukong-system").await?.is_none().then_some(()))
    })
    .await?;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(admin.clone(), NS);
    let kept = claims.get(&claim).await.context("the data disk's claim is kept")?;
    ensure!(kept.metadata.deletion_timestamp.is_none(), "the claim {claim} is not being deleted");
    ensure!(kept.metadata.owner_references.unwrap_or_default().is_empty(), "the claim {claim} has no owner left");
    guest.run_ok(&format!("mount {dev} /mnt/data")).await?;
    assert_eq!(guest.checksum("/mnt/data/data").await?, sum, "the data disk stays plugged with its data");
    Ok(())
}
