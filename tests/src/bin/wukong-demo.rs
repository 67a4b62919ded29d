//! `scripts/demo.sh`: boots a throwaway guest with the agent, then the whole story with `wukongctl` against QEMU:
//! attach (waiting until the guest sees the disk), mount and write, a detach the guest refuses (with every reason),
//! a safe detach, and a re-attach with the data intact. Then the declarative story, on a genuine kube-apiserver with
//! the lab's KubeVirt and wukong-operator running as its ServiceAccount, driven and shown with real kubectl: a `Wukong`
//! gains a disk, its removal is refused with the reasons while a writer holds it, and the disk goes on its own once
//! the writer stops.

use anyhow::{Context, Result, bail};
use kube::api::Api;
use std::path::Path;
use std::time::{Duration, Instant};
use wukong_e2e::cluster::{ADMIN, Cluster, kube_bin_dir};
use wukong_e2e::kubevirt_lab::{API_SERVER, CONTROLLER, HANDLER, HotplugMode, KubeVirtLab};
use wukong_e2e::operator_lab::{OPERATOR, Operator, install_operator};
use wukong_e2e::{Guest, wukongctl_binary};
use wukong_operator::crd::{Phase, Wukong};

fn step(text: &str) {
    println!("\n\x1b[1m==> {text}\x1b[0m");
}

/// Runs the real CLI against the guest's agent (and QEMU, for attach and detach), as a user would; returns its exit
/// code.
fn ctl_status(guest: &Guest, args: &[&str]) -> Result<i32> {
    let address = guest.agent_address().to_string();
    let qmp = guest.companion_qmp();
    let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    if matches!(args.first().map(String::as_str), Some("attach" | "detach")) {
        args.extend(["--qmp".to_string(), qmp.display().to_string()]);
    }
    println!("$ wukongctl --agent {address} {}", args.join(" "));
    let status = std::process::Command::new(wukongctl_binary())
        .arg("--agent")
        .arg(&address)
        .args(&args)
        .status()
        .context("cannot run wukongctl; build it with cargo build -p wukong-controller-client")?;
    Ok(status.code().unwrap_or(-1))
}

/// Runs the CLI and requires success.
fn ctl(guest: &Guest, args: &[&str]) -> Result<()> {
    let code = ctl_status(guest, args)?;
    anyhow::ensure!(code == 0, "wukongctl {} failed with exit code {code}", args.join(" "));
    Ok(())
}

/// The `Wukong` the declarative story applies.
const SHOP: &str = "\
apiVersion: vm.novasphere.dev/v1alpha1
kind: Wukong
metadata:
  name: shop
  namespace: shop
spec:
  cpu: 2
  memory: 4Gi
  disks:
    - name: rootdisk
      system: true
    - name: orders
      size: 64Mi
      detachOptions:
        unmount: true
        preserveData: true
";

#[tokio::main]
async fn main() -> Result<()> {
    step("booting a throwaway guest (QEMU, TCG) with wukong-agent");
    let started = Instant::now();
    let guest = Guest::boot().await?;
    println!("guest ready in {:.1} s", started.elapsed().as_secs_f64());
    ctl(&guest, &["info"])?;
    ctl(&guest, &["disks"])?;

    step("attaching a 64 MiB volume with serial 'demo-data': wukongctl waits until the guest reports it");
    let image = guest.new_image(64 << 20)?;
    let image = image.to_str().context("image path")?;
    ctl(&guest, &["attach", "demo-data", "--image", image, "--serial", "demo-data"])?;
    ctl(&guest, &["disks"])?;
    let dev = guest.agent().get_disk("demo-data", false).await?.dev_node;

    step("in the guest: a filesystem on it, mounted, and a process writing a file");
    let script = format!(
        "mkfs.ext4 -q {dev} && mkdir -p /srv/data && mount {dev} /srv/data || exit 1\n\
         (exec 3>>/srv/data/journal; echo started >&3; exec sleep 1000) </dev/null >/dev/null 2>&1 &\n\
         echo $! > /run/writer.pid"
    );
    for line in script.lines() {
        println!("# {}", line.trim());
    }
    guest.run_ok(&script).await?;
    step("who uses it? (exit code 3: in use)");
    let code = ctl_status(&guest, &["usage", "demo-data"])?;
    println!("(wukongctl exited with {code})");
    anyhow::ensure!(code == 3, "expected exit code 3 (in use), got {code}");

    step("detach it: the guest refuses while the writer runs (exit code 3, with the reasons); nothing is unplugged");
    let code = ctl_status(&guest, &["detach", "demo-data", "--unmount"])?;
    println!("(wukongctl exited with {code}; the disk is still attached and mounted)");
    anyhow::ensure!(code == 3, "expected exit code 3 (refused), got {code}");

    step(
        "the writer stops; the safe detach: the guest unmounts (idle), flushes and deletes the disk, then QEMU unplugs it",
    );
    guest.run_ok("w=$(cat /run/writer.pid); kill $w; while kill -0 $w 2>/dev/null; do usleep 50000; done").await?;
    ctl(&guest, &["detach", "demo-data", "--unmount"])?;
    ctl(&guest, &["disks"])?;

    step("attaching the same volume again: the data written before is intact");
    ctl(&guest, &["attach", "demo-data", "--image", image, "--serial", "demo-data"])?;
    let back = guest.agent().get_disk("demo-data", false).await?;
    let journal = guest.run_ok(&format!("mount {} /srv/data && cat /srv/data/journal", back.dev_node)).await?;
    println!("# cat /srv/data/journal\n{journal}");
    anyhow::ensure!(journal.trim() == "started", "the file written before the detach is not intact: {journal}");
    ctl(&guest, &["disks"])?;
    guest.run_ok("umount /srv/data").await?;
    declarative(&guest).await?;
    guest.shutdown().await;
    step("done");
    Ok(())
}

/// Runs the lab's kubectl (built with its API server by scripts/lib/install-kube.sh) as the cluster's admin, as a user
/// would type it, and shows what it prints. It runs in the kubeconfig's directory, where the demo writes its
/// manifest.
fn kubectl(kubeconfig: &Path, args: &[&str]) -> Result<()> {
    let shown: Vec<String> =
        args.iter().map(|a| if a.contains([' ', '"', '{', '[']) { format!("'{a}'") } else { a.to_string() }).collect();
    println!("$ kubectl {}", shown.join(" "));
    let binary = kube_bin_dir().join("kubectl");
    let status = std::process::Command::new(&binary)
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .current_dir(kubeconfig.parent().context("the kubeconfig's directory")?)
        // kubectl keeps its discovery cache in ~/.kube: the lab's directory is its home, not the user's.
        .env("HOME", kubeconfig.parent().context("the kubeconfig's directory")?)
        .status()
        .with_context(|| format!("cannot run {}; scripts/lib/install-kube.sh builds it", binary.display()))?;
    anyhow::ensure!(status.success(), "kubectl {} failed: {status}", args.join(" "));
    Ok(())
}

/// What a user looks at: the printer columns, then each disk's status and the detach history.
fn show(kubeconfig: &Path) -> Result<()> {
    kubectl(kubeconfig, &["-n", "shop", "get", "wukong", "shop", "-o", "wide"])?;
    kubectl(
        kubeconfig,
        &[
            "-n",
            "shop",
            "get",
            "wukong",
            "shop",
            "-o",
            "jsonpath={range .status.volumes[*]}{.name}{\"\\t\"}{.phase}{\"\\t\"}{.device}{\"\\t\"}{.blockers}{\"\\n\"}{end}\
             {range .status.history[*]}history: {.disk} {.outcome} {.reason}{\"\\n\"}{end}",
        ],
    )
}

async fn wait_for(api: &Api<Wukong>, done: impl Fn(&Wukong) -> bool) -> Result<Wukong> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let w = api.get("shop").await?;
        if done(&w) {
            return Ok(w);
        }
        if Instant::now() > deadline {
            bail!("Wukong shop did not get there within 120 s: {:#?}", w.status);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn phase_of(w: &Wukong, disk: &str) -> Option<Phase> {
    w.status.as_ref()?.volumes.iter().find(|v| v.name == disk).map(|v| v.phase)
}

/// The declarative story: a `Wukong` gains a disk, a refused removal with reasons, a safe one.
async fn declarative(guest: &Guest) -> Result<()> {
    step("declarative disks: a genuine kube-apiserver, the lab's KubeVirt, wukong-operator as its ServiceAccount");
    let cluster = Cluster::start(&[OPERATOR, API_SERVER, CONTROLLER, HANDLER]).await?;
    let kubevirt = KubeVirtLab::start(&cluster, Some(guest), "shop", HotplugMode::Declarative).await?;
    let images = tempfile::tempdir()?;
    kubevirt.provision(images.path(), "lab-images").await?;
    install_operator(&cluster).await?;
    kubevirt.create_vm("shop-vm", true, "127.0.0.1").await?;
    let _operator = Operator::start(&cluster, "demo", guest.agent_port())?.quiet();
    let api: Api<Wukong> = Api::namespaced(cluster.client(ADMIN).await?, "shop");

    let kubeconfig = cluster.kubeconfig(ADMIN)?;
    step("a Wukong with a system disk and a data disk 'orders' (unmount idle filesystems, keep the data)");
    std::fs::write(kubeconfig.with_file_name("shop.yaml"), SHOP)?;
    println!("$ cat shop.yaml\n{SHOP}");
    kubectl(&kubeconfig, &["apply", "-f", "shop.yaml"])?;
    let w = wait_for(&api, |w| phase_of(w, "orders") == Some(Phase::Attached)).await?;
    show(&kubeconfig)?;
    let dev = w.status.as_ref().and_then(|s| s.volumes.iter().find_map(|v| v.device.clone())).context("a device")?;

    step("in the guest: orders mounted, a process writing to it");
    guest
        .run_ok(&format!(
            "mkfs.ext4 -q {dev} && mkdir -p /srv/orders && mount {dev} /srv/orders && echo order-1 > /srv/orders/log
             (exec 3>>/srv/orders/log; exec sleep 1000) </dev/null >/dev/null 2>&1 &
echo $! > /run/orders.pid"
        ))
        .await?;

    step("orders removed from spec.disks: the guest refuses, the disk stays plugged, status says why");
    kubectl(
        &kubeconfig,
        &[
            "-n",
            "shop",
            "patch",
            "wukong",
            "shop",
            "--type",
            "json",
            "-p",
            r#"[{"op":"remove","path":"/spec/disks/1"}]"#,
        ],
    )?;
    wait_for(&api, |w| phase_of(w, "orders") == Some(Phase::DetachBlocked)).await?;
    show(&kubeconfig)?;
    kubectl(&kubeconfig, &["-n", "shop", "get", "events", "--field-selector", "reason=DetachRefused"])?;

    step("the writer stops: the operator retries on its own (15 s, then backing off) and the disk goes");
    guest.run_ok("w=$(cat /run/orders.pid); kill $w; while kill -0 $w 2>/dev/null; do usleep 50000; done").await?;
    let stopped = Instant::now();
    wait_for(&api, |w| phase_of(w, "orders").is_none()).await?;
    println!(
        "(detached {:.1} s after the writer stopped; the claim shop-vm-orders is kept)",
        stopped.elapsed().as_secs_f64()
    );
    show(&kubeconfig)?;
    kubectl(&kubeconfig, &["-n", "shop", "get", "pvc", "shop-vm-orders"])?;
    Ok(())
}
