//! `scripts/demo.sh`: boots a throwaway guest with the agent, then the whole story with `wukongctl` against QEMU:
//! attach (waiting until the guest sees the disk), mount and write, a detach the guest refuses (with every reason),
//! a safe detach, and a re-attach with the data intact.

use anyhow::{Context, Result};
use std::time::Instant;
use wukong_e2e::{Guest, wukongctl_binary};

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
    guest.shutdown().await;
    step("done");
    Ok(())
}
