//! `scripts/demo.sh`'s program, run whole as a newcomer runs it: it must succeed, and what it shows of the
//! declarative story must be what real kubectl printed (the CRD's printer columns, the status, the Warning Event),
//! not a summary of its own.

use anyhow::{Result, ensure};

#[test]
fn the_demo_runs_end_to_end_and_shows_what_kubectl_prints() -> Result<()> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wukong-demo")).output()?;
    let shown = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "the demo failed ({}):\n{shown}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let after = |command: &str| shown.split_once(command).map(|(_, rest)| rest.to_string()).unwrap_or_default();
    let table = after("$ kubectl -n shop get wukong shop -o wide\n");
    let header: Vec<&str> = table.lines().next().unwrap_or_default().split_whitespace().collect();
    assert_eq!(header, ["NAME", "VM", "ATTACHED", "BLOCKED", "READY", "AGE"], "kubectl's printer columns:\n{shown}");
    let patched = after(
        "$ kubectl -n shop patch wukong shop --type json -p '[{\"op\":\"remove\",\"path\":\"/spec/disks/1\"}]'\n",
    );
    assert!(patched.starts_with("wukong.vm.novasphere.dev/shop patched"), "the printed patch is the one run:\n{shown}");
    assert!(patched.contains("orders\tDetachBlocked\t/dev/sd"), "the refusal in status:\n{shown}");
    let events = after("$ kubectl -n shop get events --field-selector reason=DetachRefused\n");
    assert!(events.lines().nth(1).is_some_and(|l| l.contains("Warning") && l.contains("wukong/shop")), "{shown}");
    assert!(shown.contains("history: orders Detached"), "the detach in the history kubectl shows:\n{shown}");
    Ok(())
}
