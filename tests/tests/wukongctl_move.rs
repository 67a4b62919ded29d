//! `wukongctl move` end to end: two lab guests, each with its own QEMU, the real CLI over their companion QMP
//! sockets and the real agents. A move is refused (exit 3, the process named) while a process in the source guest
//! has a file open on the disk, and changes nothing; mistakes in the call (--force, a target volume that is taken)
//! change nothing either; once the process is gone the disk moves with its data, found in the target by its serial;
//! the move run again says it is done; and a move whose attach failed after its detach says where the disk is and
//! finishes when run again: from wukongctl's record of it, or, after the library's move (which keeps none), from
//! what the caller says to plug.

use anyhow::{Context, Result};
use serde_json::{Value, json};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use wukong_controller_client::companion::{self, AttachOptions, CompanionError, DetachOptions, MoveOptions};
use wukong_controller_client::hypervisor::{DiskBus, VolumeSource, VolumeSpec};
use wukong_controller_client::qemu::Qemu;
use wukong_e2e::{Guest, wukongctl_binary};

const SERIAL: &str = "pgdata";
const SCSI_LINK: &str = "/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_pgdata";

/// `wukongctl --agent FROM's ARGS --qmp FROM's` (attach, detach, move); a move's `--to-*` flags name `to`. Its
/// records of moves go to [`records`]`(from)`, which the guest's lab directory holds (and removes).
fn ctl(from: &Guest, to: Option<&Guest>, args: &[&str]) -> Result<Output> {
    let mut all = vec!["--agent".to_string(), from.agent_address().to_string()];
    all.extend(args.iter().map(|a| a.to_string()));
    all.extend(["--qmp".into(), path(&from.companion_qmp())]);
    if let Some(to) = to {
        all.extend(["--to-qmp".into(), path(&to.companion_qmp()), "--to-agent".into(), to.agent_address().to_string()]);
    }
    let state = from.companion_qmp().with_file_name("state");
    let out = Command::new(wukongctl_binary()).env("XDG_STATE_HOME", state).args(&all).stdin(Stdio::null()).output();
    out.context("running wukongctl")
}

/// The records of moves from `from`'s VM that wukongctl keeps (a move that stopped after its detach).
fn records(from: &Guest) -> Vec<String> {
    let dir = from.companion_qmp().with_file_name("state").join("wukongctl/moves");
    let files = std::fs::read_dir(dir).into_iter().flatten().flatten();
    files.map(|f| std::fs::read_to_string(f.path()).unwrap_or_default()).collect()
}

/// How wukongctl names the guest's QEMU.
fn qemu(guest: &Guest) -> String {
    format!("QEMU at {}", guest.companion_qmp().display())
}

fn path(p: &Path) -> String {
    p.to_str().expect("the lab's paths are UTF-8").to_string()
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[track_caller]
fn expect(out: &Output, code: i32, says: &str) {
    assert_eq!(out.status.code(), Some(code), "expected exit {code}: {}", text(out));
    assert!(text(out).contains(says), "expected {says:?} in: {}", text(out));
}

fn json_of(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("JSON from wukongctl ({e}): {}", text(out)))
}

/// Whether the guest's QEMU has device `id`, asked over the lab's own monitor (the companion's serves one client,
/// which wukongctl needs).
async fn plugged(guest: &Guest, id: &str) -> Result<bool> {
    let devices = guest.qmp.execute("qom-list", Some(json!({ "path": "/machine/peripheral" }))).await?;
    Ok(devices.as_array().is_some_and(|list| list.iter().any(|d| d["name"] == json!(id))))
}

/// The disk is where the test says, as each QEMU and each guest see it: plugged into `has`'s QEMU and seen by its
/// agent, in neither of `lacks`'s.
#[track_caller]
fn only_in<'a>(has: Option<&'a Guest>, lacks: &'a [&'a Guest]) -> impl Future<Output = Result<()>> + 'a {
    let caller = std::panic::Location::caller();
    async move {
        let seen = |guest: &'a Guest| async move { format!("{:?}", guest.agent().get_disk(SERIAL, false).await) };
        if let Some(guest) = has {
            assert!(plugged(guest, "vol1").await?, "{caller}: vol1 is plugged into the guest that should have it");
            assert!(
                guest.has_disk(SERIAL).await,
                "{caller}: the guest that should have it sees it: {}",
                seen(guest).await
            );
        }
        for guest in lacks {
            assert!(
                !plugged(guest, "vol1").await?,
                "{caller}: vol1 is not plugged into a guest that should not have it"
            );
            assert!(!guest.has_disk(SERIAL).await, "{caller}: a guest that should not have it: {}", seen(guest).await);
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn wukongctl_move_keeps_the_data_refuses_while_used_and_finishes_when_run_again() -> Result<()> {
    let (one, two) = tokio::try_join!(Guest::boot(), Guest::boot())?;
    let image = one.new_image(64 << 20)?;
    let image_arg = path(&image);
    let out = ctl(&one, None, &["attach", "vol1", "--image", &image_arg, "--serial", SERIAL])?;
    expect(&out, 0, "vol1 is attached");
    let dev = one.agent().get_disk(SERIAL, false).await?.dev_node;
    let sum = one.fill(&dev, "/mnt/m", 8 << 20).await?;
    let pid = one.start_writer("/mnt/m").await?;
    let mounted = format!("test -b {dev} && grep -q ' /mnt/m ' /proc/mounts");

    // In use in the source guest: refused as a detach is, every reason printed, nothing changed anywhere.
    let refused = ctl(&one, Some(&two), &["move", "vol1", "--unmount"])?;
    expect(&refused, 3, &format!("sleep (pid {pid}, uid 0) has /mnt/m/log open for writing"));
    assert!(text(&refused).contains("nothing was detached"), "{}", text(&refused));
    one.run_ok(&mounted).await.context("still mounted in the source guest after the refusal")?;
    only_in(Some(&one), &[&two]).await?;

    // Mistakes in the call change nothing: --force is refused before anything is contacted (exit 2, one line) ...
    let forced = ctl(&one, Some(&two), &["move", "vol1", "--unmount", "--force"])?;
    expect(&forced, 2, "a move of volume 'vol1' is never forced: a move exists to keep the data");
    assert_eq!(String::from_utf8_lossy(&forced.stderr).lines().count(), 1, "{}", text(&forced));
    // ... and so is a target that has a volume of that name already (another disk), found before the source is asked.
    let other = two.new_image(16 << 20)?;
    let out = ctl(&two, None, &["attach", "vol1", "--image", &path(&other), "--serial", "other"])?;
    expect(&out, 0, "vol1 is attached");
    let taken = ctl(&one, Some(&two), &["move", "vol1", "--unmount"])?;
    expect(&taken, 2, "is attached to QEMU at");
    assert!(text(&taken).contains("with serial 'other', not 'pgdata'"), "{}", text(&taken));
    one.run_ok(&mounted).await.context("still mounted after the refused moves")?;
    expect(&ctl(&two, None, &["detach", "vol1"])?, 0, "vol1 is detached");
    only_in(Some(&one), &[&two]).await?;

    // The writer is gone: the disk moves, with its serial, and the target guest finds it by that serial.
    one.stop_process(&pid).await?;
    let moved = ctl(&one, Some(&two), &["move", "vol1", "--unmount"])?;
    expect(&moved, 0, "vol1 moved: from QEMU at");
    let target_dev = two.agent().get_disk(SERIAL, false).await?.dev_node;
    let said = text(&moved);
    assert!(said.contains(&format!("now {target_dev} in the target guest")), "{said}");
    assert!(said.contains(&format!("{SERIAL} ({dev}) is released and may be unplugged")), "{said}");
    assert!(said.contains("/mnt/m"), "the release says what it unmounted: {said}");
    only_in(Some(&two), &[&one]).await?;
    one.run_ok(&format!("! test -e {dev} && ! grep -q ' /mnt/m ' /proc/mounts")).await.context("gone from one")?;
    two.run_ok(&format!("mkdir -p /mnt/m && mount {SCSI_LINK} /mnt/m")).await.context("mounted by its serial")?;
    assert_eq!(two.checksum("/mnt/m/data").await?, sum, "the data moved intact");

    // Run again: done already, and each half says so.
    let again = ctl(&one, Some(&two), &["move", "vol1"])?;
    expect(&again, 0, &format!("vol1 was already moved to {}", qemu(&two)));
    let again = json_of(&ctl(&one, Some(&two), &["-o", "json", "move", "vol1"])?);
    assert_eq!(again["detach"]["already"], true, "{again}");
    assert_eq!(again["attach"]["already"], true, "{again}");
    assert_eq!(again["attach"]["disk"]["dev_node"], target_dev.as_str(), "{again}");
    assert_eq!(again["serial"], SERIAL, "{again}");
    only_in(Some(&two), &[&one]).await?;

    // Back to guest one, with an attach that fails after the detach (there is no SCSI bus by that name): the error
    // says where the disk is and what finishes the move, and wukongctl keeps a record of it, which the same move,
    // run again, plugs.
    let stopped = ctl(&two, Some(&one), &["move", "vol1", "--unmount", "--to-scsi-bus", "nosuch.0"])?;
    let (qemu_one, qemu_two) = (qemu(&one), qemu(&two));
    expect(&stopped, 1, &format!("volume 'vol1' is detached from {qemu_two} and not attached to {qemu_one} as 'vol1'"));
    assert!(text(&stopped).contains("Run the same move again to finish it"), "{}", text(&stopped));
    assert_eq!(String::from_utf8_lossy(&stopped.stderr).lines().count(), 1, "{}", text(&stopped));
    only_in(None, &[&one, &two]).await?;
    let recorded = records(&two);
    assert!(recorded.len() == 1 && recorded[0].contains(&image_arg) && recorded[0].contains(SERIAL), "{recorded:?}");
    let finished = ctl(&two, Some(&one), &["move", "vol1"])?;
    expect(&finished, 0, &format!("vol1 moved to {qemu_one} (an earlier run had detached it from {qemu_two})"));
    assert!(records(&two).is_empty(), "the record is gone once the move finished: {:?}", records(&two));
    only_in(Some(&one), &[&two]).await?;
    one.run_ok(&format!("mount {SCSI_LINK} /mnt/m")).await.context("back in guest one, by its serial")?;
    assert_eq!(one.checksum("/mnt/m/data").await?, sum, "the data came back intact");

    // To guest two again, through the library, with an attach that fails after the detach (QEMU cannot open the
    // image it is given): the same error. The library keeps no record, so neither QEMU nor wukongctl can say what
    // to plug: nothing changes until the caller does.
    let wrong = VolumeSpec {
        name: "vol1".into(),
        serial: SERIAL.into(),
        bus: DiskBus::Scsi,
        source: VolumeSource::Image { path: "/nonexistent/vol1.raw".into(), format: "raw".into() },
    };
    let options = MoveOptions {
        detach: DetachOptions {
            volume: "vol1".into(),
            serial: None,
            unmount: true,
            force: false,
            timeout: Duration::from_secs(60),
            poll: Duration::from_millis(200),
        },
        attach: AttachOptions { timeout: Duration::from_secs(60), poll: Duration::from_millis(200) },
    };
    let (from, to) = (Qemu::connect(&one.companion_qmp()).await?, Qemu::connect(&two.companion_qmp()).await?);
    let err = companion::move_volume(&from, &one.agent(), &to, &two.agent(), &wrong, &options, &|_| {})
        .await
        .expect_err("QEMU cannot plug a file that does not exist");
    let CompanionError::MoveIncomplete { .. } = &err else { panic!("expected MoveIncomplete, got {err}") };
    let message = err.to_string();
    assert!(message.starts_with(&format!("volume 'vol1' is detached from {qemu_one} and not attached to {qemu_two}")));
    assert!(message.ends_with("Run the same move again to finish it"), "{message}");
    drop((from, to));
    only_in(None, &[&one, &two]).await?;
    let lost = ctl(&one, Some(&two), &["move", "vol1"])?;
    expect(&lost, 1, &format!("volume 'vol1' is neither in {qemu_one} nor, as 'vol1', in {qemu_two}"));
    assert!(text(&lost).contains("say what to plug (--image FILE"), "{}", text(&lost));
    let finished = ctl(&one, Some(&two), &["-o", "json", "move", "vol1", "--image", &image_arg, "--serial", SERIAL])?;
    assert_eq!(finished.status.code(), Some(0), "{}", text(&finished));
    let finished = json_of(&finished);
    assert_eq!(finished["detach"]["already"], true, "the source had nothing left to detach: {finished}");
    assert_eq!(finished["attach"]["already"], false, "{finished}");
    only_in(Some(&two), &[&one]).await?;
    two.run_ok(&format!("mount {SCSI_LINK} /mnt/m")).await.context("in guest two again, by its serial")?;
    assert_eq!(two.checksum("/mnt/m/data").await?, sum, "the data moved intact again");
    Ok(())
}

/// `wukongctl --vmi NS/VM move VOLUME --to-vmi VM2` on the lab's KubeVirt, each VMI with a guest of its own: refused
/// while the source guest uses the disk, then the same claim leaves the first VMI and is plugged into the second,
/// with the data, and no unplug pulled it out from under a guest.
#[tokio::test(flavor = "multi_thread")]
async fn wukongctl_moves_a_kubevirt_volume_to_another_vmi_with_its_claim() -> Result<()> {
    use kube::api::{Api, DynamicObject};
    use wukong_controller_client::hypervisor::{Hypervisor, VolumeState};
    use wukong_controller_client::kubevirt::{KubeVirt, vmi_resource};
    use wukong_e2e::cluster::{ADMIN, Cluster};
    use wukong_e2e::kubevirt_lab::{API_SERVER, CONTROLLER, HANDLER, HotplugMode, KubeVirtLab, attach_claim};
    let (one, two) = tokio::try_join!(Guest::boot(), Guest::boot())?;
    let cluster = Cluster::start(&[API_SERVER, CONTROLLER, HANDLER]).await?;
    let kubevirt = KubeVirtLab::start(&cluster, Some(&one), "mv", HotplugMode::Declarative).await?;
    kubevirt.add_guest("vm2", &two).await?;
    // Addresses of this test's own, each forwarded to its guest's agent port.
    let (a, b) = (std::net::Ipv4Addr::new(127, 0, 28, 11), std::net::Ipv4Addr::new(127, 0, 28, 12));
    one.forward_agent(a).await?;
    two.forward_agent(b).await?;
    kubevirt.create_vm("vm1", true, &a.to_string()).await?;
    kubevirt.create_vm("vm2", true, &b.to_string()).await?;
    let image = one.new_image(64 << 20)?;
    kubevirt.create_claim("pg", &image).await?;
    let admin = cluster.client(ADMIN).await?;
    let (vm1, vm2) =
        (KubeVirt::new(admin.clone(), "mv", "vm1", false), KubeVirt::new(admin.clone(), "mv", "vm2", false));
    let dev = attach_claim(&one, &vm1, "data", "pg").await?;
    let sum = one.fill(&dev, "/mnt/m", 4 << 20).await?;
    let pid = one.start_writer("/mnt/m").await?;
    let kubeconfig = cluster.kubeconfig(ADMIN)?;
    // Its records of moves in the lab's directory, not under the caller's $HOME.
    let state = one.companion_qmp().with_file_name("state");
    let ctl = |args: &[&str]| {
        let all = [&["--vmi", "mv/vm1"][..], args].concat();
        let mut command = Command::new(wukongctl_binary());
        command.env("KUBECONFIG", &kubeconfig).env("XDG_STATE_HOME", &state);
        command.args(all).stdin(Stdio::null()).output()
    };

    let refused = ctl(&["move", "data", "--to-vmi", "vm2", "--unmount"])?;
    expect(&refused, 3, &format!("(pid {pid}, uid 0) has /mnt/m/log open for writing"));
    assert!(matches!(vm1.volume_state("data").await?, VolumeState::Ready { .. }), "still plugged into vm1");
    assert_eq!(vm2.volume_state("data").await?, VolumeState::Absent, "nothing added to vm2");
    one.run_ok("grep -q ' /mnt/m ' /proc/mounts").await.context("still mounted in vm1's guest")?;

    one.stop_process(&pid).await?;
    let moved = ctl(&["-o", "json", "move", "data", "--to-vmi", "vm2", "--unmount"])?;
    assert_eq!(moved.status.code(), Some(0), "{}", text(&moved));
    let moved = json_of(&moved);
    assert_eq!((moved["detach"]["already"].clone(), moved["attach"]["already"].clone()), (json!(false), json!(false)));
    assert_eq!(vm1.volume_state("data").await?, VolumeState::Absent, "gone from vm1");
    let vmis = Api::<DynamicObject>::namespaced_with(admin, "mv", &vmi_resource());
    let volumes = vmis.get("vm2").await?.data["spec"]["volumes"].clone();
    let claims: Vec<&str> = volumes
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["persistentVolumeClaim"]["claimName"].as_str())
        .collect();
    assert_eq!(claims, ["pg"], "the same claim, in vm2: {volumes}");
    assert!(!one.has_disk("data").await, "gone from vm1's guest");
    let target = two.agent().get_disk("data", false).await?.dev_node;
    assert_eq!(moved["attach"]["disk"]["dev_node"], target.as_str(), "{moved}");
    two.run_ok(&format!("mkdir -p /mnt/m && mount {target} /mnt/m")).await?;
    assert_eq!(two.checksum("/mnt/m/data").await?, sum, "the data moved intact");
    assert!(kubevirt.unsafe_unplugs().is_empty(), "{:?}", kubevirt.unsafe_unplugs());
    Ok(())
}
