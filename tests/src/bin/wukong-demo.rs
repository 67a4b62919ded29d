//! `scripts/demo.sh`: boots a throwaway guest with the agent, hot-plugs a disk, shows who uses it, a release the
//! agent refuses (with every reason) and a safe one, then unplugs and re-plugs the disk with its data intact.

use anyhow::{Context, Result};
use std::time::{Duration, Instant};
use wukong_e2e::{DiskSpec, Guest, wukongctl_binary};

fn step(text: &str) {
    println!("\n\x1b[1m==> {text}\x1b[0m");
}

/// Runs the real CLI against the guest's agent, as a user would; returns its exit code.
fn ctl_status(guest: &Guest, args: &[&str]) -> Result<i32> {
    let address = guest.agent_address().to_string();
    println!("$ wukongctl --agent {address} {}", args.join(" "));
    let status = std::process::Command::new(wukongctl_binary())
        .arg("--agent")
        .arg(&address)
        .args(args)
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

#[tokio::main]
async fn main() -> Result<()> {
    step("booting a throwaway guest (QEMU, TCG) with wukong-agent");
    let started = Instant::now();
    let guest = Guest::boot().await?;
    println!("guest ready in {:.1} s", started.elapsed().as_secs_f64());
    ctl(&guest, &["info"])?;
    ctl(&guest, &["disks"])?;

    step("hot-plugging a 64 MiB virtio-scsi disk with serial 'demo-data' over QMP");
    let plugged_at = Instant::now();
    let disk = guest.hotplug(&DiskSpec::scsi("demo-data")).await?;
    let seen = guest.agent().wait_for_disk("demo-data", Duration::from_secs(30)).await?;
    println!(
        "the agent reported {} as {} {:.0} ms after device_add",
        seen.serial,
        seen.dev_node,
        plugged_at.elapsed().as_secs_f64() * 1000.0
    );
    ctl(&guest, &["disks"])?;

    step("in the guest: a filesystem on it, mounted, and a process writing a file");
    let dev = &seen.dev_node;
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

    step("release it for unplugging: refused while the writer runs (exit code 3, with the reasons)");
    let code = ctl_status(&guest, &["release", "demo-data", "--unmount"])?;
    println!("(wukongctl exited with {code}; nothing was changed)");
    anyhow::ensure!(code == 3, "expected exit code 3 (refused), got {code}");

    step("the writer stops; a dry run says what a release would do");
    guest.run_ok("w=$(cat /run/writer.pid); kill $w; while kill -0 $w 2>/dev/null; do usleep 50000; done").await?;
    ctl(&guest, &["release", "demo-data", "--unmount", "--dry-run"])?;

    step("the safe release: unmount (idle), flush, delete the SCSI device in the guest");
    ctl(&guest, &["release", "demo-data", "--unmount"])?;
    ctl(&guest, &["disks"])?;

    step("unplugging it, then plugging the same volume back: the data written before is intact");
    guest.unplug(&disk).await?;
    guest.replug(&disk).await?;
    let back = guest.agent().wait_for_disk("demo-data", Duration::from_secs(30)).await?;
    let journal = guest.run_ok(&format!("mount {} /srv/data && cat /srv/data/journal", back.dev_node)).await?;
    println!("# cat /srv/data/journal\n{journal}");
    anyhow::ensure!(journal.trim() == "started", "the file written before the release is not intact: {journal}");
    ctl(&guest, &["disks"])?;
    guest.shutdown().await;
    step("done");
    Ok(())
}
