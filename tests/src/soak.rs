//! The fault soak (issue 25): rounds of random work against the real API server, the lab's KubeVirt and a QEMU
//! guest, with faults injected at random moments, and invariants checked after every round. Jepsen's way: the seed
//! decides every choice (which work, which fault, when), and is printed so that a run can be replayed; the timing
//! of the real processes is not under its control, so a replay takes the same steps, not the same interleaving.
//!
//! The lab: VM `wk-vm`, owned by Wukong `wk` (disks `w1`..`w3` come and go through `spec.disks`), and VM `vm1`, a
//! user's VM opted into the guard (disks `u1`, `u2` attached with the companion, removed with kubectl-style patches
//! or virtctl-style `removevolume`). Two operator replicas, both serving the guard (the API server calls the one
//! registered last); KubeVirt's virt-handler asks the guest, through the lab's shell, whether each disk it unplugs
//! is still used (the oracle, [`KubeVirtLab::unsafe_unplugs`]).
//!
//! Invariants after every round: no unsafe unplug that was not forced; every checksum written to a disk reads back
//! intact after its re-attach (and after a guest reboot); every `Wukong` converges to its spec within
//! [`CONVERGENCE_BOUND`]; no listed disk stays released in the guest; no claim deleted that `preserveData` kept; no
//! forced unplug without its Warning Event.

use crate::Guest;
use crate::cluster::{ADMIN, Cluster};
use crate::kubevirt_lab::{
    KubeVirtLab, UnplugFailure, attach_claim, removal_patch, removevolume, resource, template_volumes,
};
use crate::operator_lab::{Operator, events, guest_cluster, json_patch, label, set_disks, start_guarded, volume};
use anyhow::{Context, Result};
use kube::api::{Api, DynamicObject};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};
use wukong_controller_client::agent_client::AgentClient;
use wukong_controller_client::kubevirt::{KubeVirt, vm_resource};
use wukong_operator::crd::{Phase, Wukong};
use wukong_operator::guard::{FORCE_ANNOTATION, GUARD_LABEL, UNMOUNT_ANNOTATION};
use wukong_proto::v1::DiskState;

const NS: &str = "soak";
/// The Wukong and its VM.
const WUKONG: &str = "wk";
const WUKONG_VM: &str = "wk-vm";
/// The user's guarded VM.
const USER_VM: &str = "vm1";
const WUKONG_DISKS: [&str; 3] = ["w1", "w2", "w3"];
const USER_DISKS: [&str; 2] = ["u1", "u2"];
/// How long every Wukong and VM may take to reach its spec after a round's faults are healed. The operator's first
/// retry of a refused detach comes 15 s after the refusal, its second 30 s after; a leader killed leaves its lease
/// to expire (15 s) before the standby acts.
pub const CONVERGENCE_BOUND: Duration = Duration::from_secs(150);
/// How long a forced unlist waits for the operator to record the force before it unlists the disk anyway.
const FORCE_RECORDED_WAIT: Duration = Duration::from_secs(20);
/// The guard gives a release whose update was never stored back after this long.
const GUARD_GRACE_SECONDS: &str = "5";
/// The bytes of data each disk carries (its checksum is the invariant).
const DATA_BYTES: u64 = 2 << 20;
const DISK_BYTES: u64 = 32 << 20;

/// How a soak runs.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    pub seed: u64,
    pub rounds: u32,
}

/// What a soak did and found.
#[derive(Debug, Default)]
pub struct Report {
    pub seed: u64,
    pub rounds: u32,
    /// Work done, by kind.
    pub actions: BTreeMap<&'static str, u32>,
    /// Faults injected, by kind.
    pub faults: BTreeMap<&'static str, u32>,
    /// Every broken invariant: "round N: what".
    pub violations: Vec<String>,
    /// Each round's time from its faults healed to every object at its spec.
    pub convergence: Vec<Duration>,
    /// Unplugs the oracle checked, and those of them that were forced (used, with the user's consent).
    pub checked_unplugs: usize,
    pub forced_unplugs: usize,
    /// Unplugs the oracle could not judge because the guest was resetting (its shell down): not counted as unsafe.
    pub unjudged_unplugs: usize,
    pub elapsed: Duration,
    /// The oracle's records already examined by an earlier round.
    examined: usize,
}

impl Report {
    pub fn worst_convergence(&self) -> Duration {
        self.convergence.iter().copied().max().unwrap_or_default()
    }

    /// The report as the benchmark and the test print it.
    pub fn summary(&self) -> String {
        let kinds = |m: &BTreeMap<&str, u32>| m.iter().map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", ");
        let mut sorted = self.convergence.clone();
        sorted.sort();
        let median = sorted.get(sorted.len() / 2).copied().unwrap_or_default();
        format!(
            "fault soak, seed {}: {} rounds in {:.0} s\n  work: {}\n  faults ({} in all): {}\n  unplugs checked by \
             the oracle: {} ({} forced, {} unjudged: the guest was resetting)\n  convergence after healing: median \
             {:.1} s, worst {:.1} s (bound {} s)\n  violations: {}{}",
            self.seed,
            self.rounds,
            self.elapsed.as_secs_f64(),
            kinds(&self.actions),
            self.faults.values().sum::<u32>(),
            kinds(&self.faults),
            self.checked_unplugs,
            self.forced_unplugs,
            self.unjudged_unplugs,
            median.as_secs_f64(),
            self.worst_convergence().as_secs_f64(),
            CONVERGENCE_BOUND.as_secs(),
            self.violations.len(),
            self.violations.iter().map(|v| format!("\n    {v}")).collect::<String>(),
        )
    }
}

/// Who plugs and unplugs a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    Wukong,
    User,
}

/// What the soak knows of one disk.
#[derive(Debug, Clone)]
struct Disk {
    name: &'static str,
    owner: Owner,
    /// In the spec: listed in the Wukong, or in the user VM's template.
    wanted: bool,
    /// Mounted at /mnt/NAME in the guest by the soak.
    mounted: bool,
    /// A process holding a file open under the mount.
    writer: Option<String>,
    /// The checksum of /mnt/NAME/data, while its claim keeps it.
    checksum: Option<String>,
    /// preserveData of its listing (a Wukong disk).
    preserve: bool,
    /// Its last removal was forced: it may be unplugged while used, and its data is not counted on.
    forced: bool,
    /// Left the spec since the soak mounted it: a detach may have unmounted it, even if the spec lists it again.
    unlisted: bool,
}

impl Disk {
    fn mnt(&self) -> String {
        format!("/mnt/{}", self.name)
    }
}

/// One round's work.
#[derive(Debug, Clone, Copy)]
enum Action {
    /// A Wukong disk listed (plugged), its data preserved on a detach or not.
    List(usize, bool),
    /// A Wukong disk unlisted (detached as soon as the guest lets go), forced or not.
    Unlist(usize, bool),
    /// A user disk attached with the companion.
    Attach(usize),
    /// A user disk removed from the VM's spec (kubectl patch or `removevolume`), forced or not.
    Remove(usize, Removal, bool),
    StartWriter(usize),
    StopWriter(usize),
}

#[derive(Debug, Clone, Copy)]
enum Removal {
    Patch,
    RemoveVolume,
}

impl Action {
    fn kind(&self) -> &'static str {
        match self {
            Self::List(..) => "wukong lists a disk",
            Self::Unlist(_, false) => "wukong unlists a disk",
            Self::Unlist(_, true) => "wukong unlists a disk, forced",
            Self::Attach(_) => "companion attach",
            Self::Remove(_, Removal::Patch, false) => "kubectl patch removal",
            Self::Remove(_, Removal::RemoveVolume, false) => "removevolume",
            Self::Remove(_, _, true) => "forced removal",
            Self::StartWriter(_) => "writer starts",
            Self::StopWriter(_) => "writer stops",
        }
    }
}

/// The faults, each at a random moment of a round's work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// SIGKILL of the guest's agent, started again after a while.
    KillAgent,
    /// SIGKILL of the operator replica that holds the lease, restarted.
    KillLeader,
    /// SIGKILL of the replica the API server sends reviews to, restarted on the same address.
    KillWebhook,
    RestartApiServer,
    RestartEtcd,
    /// Every unplug fails in QEMU/libvirt for a while.
    UnplugRefused,
    /// KubeVirt takes seconds from a volume leaving the spec to the unplug.
    SlowUnplug,
    /// The leader stops (SIGSTOP) for seconds and resumes with a stale watch cache and maybe a lost lease.
    StaleLeader,
    /// The guest reboots (a reset: its mounts and writers are gone, its disks stay plugged).
    GuestReboot,
}

const FAULTS: [Fault; 9] = [
    Fault::KillAgent,
    Fault::KillLeader,
    Fault::KillWebhook,
    Fault::RestartApiServer,
    Fault::RestartEtcd,
    Fault::UnplugRefused,
    Fault::SlowUnplug,
    Fault::StaleLeader,
    Fault::GuestReboot,
];

impl Fault {
    fn kind(&self) -> &'static str {
        match self {
            Self::KillAgent => "agent SIGKILL",
            Self::KillLeader => "leader operator SIGKILL",
            Self::KillWebhook => "webhook replica SIGKILL",
            Self::RestartApiServer => "kube-apiserver restart",
            Self::RestartEtcd => "etcd restart",
            Self::UnplugRefused => "unplug refused by QEMU",
            Self::SlowUnplug => "slow unplug",
            Self::StaleLeader => "stale leader (SIGSTOP)",
            Self::GuestReboot => "guest reboot",
        }
    }
}

/// What faults act on: the processes the soak kills and restarts.
struct Processes {
    cluster: Cluster,
    /// Two replicas; the second serves the reviews.
    operators: [Operator; 2],
}

/// What the work acts through.
struct Lab {
    guest: Guest,
    kubevirt: KubeVirtLab,
    admin: kube::Client,
    wukongs: Api<Wukong>,
    vms: Api<DynamicObject>,
    _images: tempfile::TempDir,
    /// When the guest was resetting: an oracle that could not ask it then judged nothing.
    resets: std::sync::Mutex<Vec<(SystemTime, SystemTime)>>,
}

/// Runs a soak and reports; an error is a lab that could not run (a broken invariant is a violation in the report).
pub async fn run(config: Config) -> Result<Report> {
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(config.seed);
    let mut report = Report { seed: config.seed, ..Default::default() };
    let (lab, mut processes) = start().await?;
    let mut disks: Vec<Disk> = WUKONG_DISKS
        .iter()
        .map(|n| (n, Owner::Wukong))
        .chain(USER_DISKS.iter().map(|n| (n, Owner::User)))
        .map(|(name, owner)| Disk {
            name,
            owner,
            wanted: false,
            mounted: false,
            unlisted: false,
            writer: None,
            checksum: None,
            preserve: true,
            forced: false,
        })
        .collect();
    for round in 1..=config.rounds {
        let fault = rng.random_bool(0.8).then(|| FAULTS[rng.random_range(0..FAULTS.len())]);
        let delay = Duration::from_millis(rng.random_range(0..2500));
        let pause = Duration::from_millis(rng.random_range(500..4000));
        let begun = Instant::now();
        let steps = rng.random_range(1..=3);
        // The time, to find the round in the operators' and the API server's logs.
        let at = k8s_openapi::jiff::Timestamp::now();
        println!(
            "round {round} at {at:.3}: {steps} steps of work, fault {:?} after {delay:?}",
            fault.map(|f| f.kind())
        );
        if let Some(f) = fault {
            *report.faults.entry(f.kind()).or_default() += 1;
        }
        let work = async {
            for _ in 0..steps {
                let action = choose(&mut rng, &disks);
                *report.actions.entry(action.kind()).or_default() += 1;
                println!("round {round}: {} ({action:?})", action.kind());
                if let Err(e) = act(&lab, &mut disks, action).await {
                    // Work a fault broke (an API server away, an agent killed) is the user's to retry; what it
                    // changed is read back below.
                    println!("round {round}: the work failed: {}", short(&format!("{e:#}")));
                    break;
                }
                // A forced removal ends the round's work: what it left (a stale mount) is cleared after it.
                if matches!(action, Action::Unlist(_, true) | Action::Remove(_, _, true)) {
                    break;
                }
            }
        };
        let ((), faulted) = tokio::join!(work, async {
            match fault {
                Some(f) => {
                    tokio::time::sleep(delay).await;
                    inject(&lab, &mut processes, f, pause).await
                }
                None => Ok(()),
            }
        });
        faulted.with_context(|| format!("round {round}: injecting {fault:?}"))?;
        if fault == Some(Fault::GuestReboot) {
            for disk in &mut disks {
                disk.mounted = false;
                disk.writer = None;
            }
        }
        let healed = Instant::now();
        let converged = converge(&lab, &mut disks).await;
        let took = healed.elapsed();
        report.convergence.push(took);
        match converged {
            Ok(()) => println!(
                "round {round}: converged in {:.1} s (the round's work and faults took {:.1} s)",
                took.as_secs_f64(),
                (healed - begun).as_secs_f64()
            ),
            Err(e) => {
                println!("VIOLATION round {round}: did not converge within the bound: {}", short(&format!("{e:#}")));
                report.violations.push(format!("round {round}: did not converge within the bound: {e:#}"))
            }
        }
        let mut found = check(&lab, &mut disks, &mut report).await?;
        found.extend(settle(&lab, &mut disks).await.with_context(|| format!("round {round}: mounting the disks"))?);
        // Said as found too: a run that is stopped still tells what it saw.
        for violation in found {
            let violation = format!("round {round} (seed {}): {violation}", config.seed);
            println!("VIOLATION {violation}");
            report.violations.push(violation);
        }
        report.rounds = round;
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

async fn start() -> Result<(Lab, Processes)> {
    let (guest, cluster, kubevirt, images) = guest_cluster(NS).await?;
    let admin = cluster.client(ADMIN).await?;
    let vms: Api<DynamicObject> = Api::namespaced_with(admin.clone(), NS, &vm_resource());
    // The VMIs report the loopback address: the lab forwards the guest agent's port there.
    kubevirt.create_vm(WUKONG_VM, true, "127.0.0.1").await?;
    kubevirt.create_vm(USER_VM, true, "127.0.0.1").await?;
    let opted_in = json!({GUARD_LABEL: "enabled"});
    label(&vms, USER_VM, opted_in, json!({UNMOUNT_ANNOTATION: "true"})).await?;
    for name in USER_DISKS {
        kubevirt.create_claim(&format!("pvc-{name}"), &guest.new_image(DISK_BYTES)?).await?;
    }
    let port = guest.agent_port();
    let grace = ["--guard-grace-seconds", GUARD_GRACE_SECONDS];
    let first = start_guarded(&cluster, "soak-a", port, &grace).await?.quiet();
    let second = start_guarded(&cluster, "soak-b", port, &grace).await?.quiet();
    let wukongs: Api<Wukong> = Api::namespaced(admin.clone(), NS);
    let spec = json!({"vmName": WUKONG_VM, "disks": [{"name": "rootdisk", "system": true}]});
    crate::operator_lab::create_wukong(&wukongs, WUKONG, spec).await?;
    let lab = Lab { guest, kubevirt, admin, wukongs, vms, _images: images, resets: Default::default() };
    Ok((lab, Processes { cluster, operators: [first, second] }))
}

/// A random piece of work that makes sense in the current state.
fn choose(rng: &mut StdRng, disks: &[Disk]) -> Action {
    let mut options = Vec::new();
    for (i, d) in disks.iter().enumerate() {
        let plugged = d.wanted || d.writer.is_some();
        match (d.owner, d.wanted) {
            (Owner::Wukong, false) if !plugged => options.push(Action::List(i, rng.random_bool(0.7))),
            (Owner::Wukong, true) => {
                options.push(Action::Unlist(i, false));
                options.push(Action::Unlist(i, false));
                options.push(Action::Unlist(i, rng.random_bool(0.15)));
            }
            (Owner::User, false) => options.push(Action::Attach(i)),
            (Owner::User, true) => {
                let via = if rng.random_bool(0.5) { Removal::Patch } else { Removal::RemoveVolume };
                options.push(Action::Remove(i, via, false));
                options.push(Action::Remove(i, via, rng.random_bool(0.15)));
            }
            _ => {}
        }
        // A writer starts on a disk in use, not on one on its way out (whose mount may already be gone).
        if d.wanted && d.mounted && d.writer.is_none() {
            options.push(Action::StartWriter(i));
        }
        if d.writer.is_some() {
            options.push(Action::StopWriter(i));
            options.push(Action::StopWriter(i));
        }
    }
    options[rng.random_range(0..options.len())]
}

async fn act(lab: &Lab, disks: &mut [Disk], action: Action) -> Result<()> {
    match action {
        Action::List(i, preserve) => {
            disks[i].wanted = true;
            disks[i].preserve = preserve;
            disks[i].forced = false;
            set_disks(&lab.wukongs, WUKONG, wukong_disks(disks)).await?;
        }
        Action::Unlist(i, force) => {
            if force {
                // The option is read from the listing: the disk is forced while still listed, then unlisted. As
                // the README tells users, it counts once the operator recorded it (status.volumes[].detachOptions):
                // a listing it never saw (two writes coalesced into one reconcile, a leader killed between them)
                // cannot be known after the disk left the spec, and the detach is then not forced.
                disks[i].forced = true;
                set_disks(&lab.wukongs, WUKONG, wukong_disks(disks)).await?;
                disks[i].forced = force_recorded(lab, disks[i].name).await;
                println!("  force of {} recorded by the operator: {}", disks[i].name, disks[i].forced);
            }
            disks[i].wanted = false;
            disks[i].unlisted = true;
            // Without preserveData its claim goes with the detach: its data is not counted on from now.
            if !disks[i].preserve {
                disks[i].checksum = None;
            }
            set_disks(&lab.wukongs, WUKONG, wukong_disks(disks)).await?;
        }
        Action::Attach(i) => {
            let kubevirt = KubeVirt::new(lab.admin.clone(), NS, USER_VM, false);
            let name = disks[i].name;
            disks[i].wanted = true;
            disks[i].forced = false;
            attach_claim(&lab.guest, &kubevirt, name, &format!("pvc-{name}")).await?;
        }
        Action::Remove(i, via, force) => {
            let name = disks[i].name;
            disks[i].forced |= force;
            let outcome = remove(lab, name, via, force).await;
            if force {
                // Whatever became of the removal (an API server restarting may have cut it short): an annotation
                // left on the VM would force every later removal, which the guard then rightly lets through.
                let deadline = Instant::now() + Duration::from_secs(60);
                while let Err(e) = label(&lab.vms, USER_VM, json!({}), json!({FORCE_ANNOTATION: null})).await {
                    anyhow::ensure!(Instant::now() < deadline, "the force annotation of {USER_VM} stays: {e:#}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            let outcome = outcome?;
            println!("  removal of {name}: {}", outcome.as_ref().err().map_or("allowed", |e| short(e)));
            // Allowed, the VM's spec no longer has it, and unforced, the guard had the guest unmount it (what a
            // refusal left is read back after the round).
            if outcome.is_ok() {
                disks[i].wanted = false;
                disks[i].unlisted = true;
                disks[i].mounted &= force;
            }
        }
        Action::StartWriter(i) => {
            // Only on the disk itself: a detach earlier in the round may have unmounted it.
            let mnt = disks[i].mnt();
            if lab.guest.run(&format!("grep -q ' {mnt} ' /proc/mounts")).await?.status == 0 {
                disks[i].writer = Some(lab.guest.start_writer(&mnt).await?);
            } else {
                println!("  {mnt} is no longer mounted: no writer");
            }
        }
        Action::StopWriter(i) => {
            if let Some(pid) = disks[i].writer.take() {
                lab.guest.stop_process(&pid).await?;
            }
        }
    }
    Ok(())
}

/// Removes user disk `name` from the user VM through the guard, the VM annotated to force it when `force`: the
/// API server's refusal as `Err` inside; a request that could not be made (or answered) is the outer error.
async fn remove(lab: &Lab, name: &str, via: Removal, force: bool) -> Result<std::result::Result<(), String>> {
    if force {
        label(&lab.vms, USER_VM, json!({}), json!({FORCE_ANNOTATION: "true"})).await?;
    }
    Ok(match via {
        Removal::Patch => {
            let patch = removal_patch(&lab.vms.get(USER_VM).await?, "/spec/template/spec", name)?;
            json_patch(&lab.vms, USER_VM, patch, false).await?.map_err(|(code, m)| format!("{code}: {m}"))
        }
        Removal::RemoveVolume => {
            removevolume(&lab.admin, NS, "virtualmachines", USER_VM, name, false).await.map_err(|e| e.to_string())
        }
    })
}

/// Whether the operator recorded disk `name`'s `force` in its status, waited for as a careful user would (faults
/// may keep the operator away meanwhile).
async fn force_recorded(lab: &Lab, name: &str) -> bool {
    let deadline = Instant::now() + FORCE_RECORDED_WAIT;
    while Instant::now() < deadline {
        if let Ok(wukong) = lab.wukongs.get(WUKONG).await
            && volume(&wukong, name).is_some_and(|v| v.detach_options.force)
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// The Wukong's disks as the soak wants them.
fn wukong_disks(disks: &[Disk]) -> Value {
    let mut list = vec![json!({"name": "rootdisk", "system": true})];
    for d in disks.iter().filter(|d| d.owner == Owner::Wukong && d.wanted) {
        let options = json!({"unmount": true, "preserveData": d.preserve, "force": d.forced});
        list.push(json!({"name": d.name, "size": "32Mi", "detachOptions": options}));
    }
    Value::Array(list)
}

async fn inject(lab: &Lab, processes: &mut Processes, fault: Fault, pause: Duration) -> Result<()> {
    match fault {
        Fault::KillAgent => {
            lab.guest.kill_agent().await?;
            tokio::time::sleep(pause).await;
            lab.guest.start_agent().await?;
        }
        Fault::KillLeader => {
            let leader = leader(&lab.admin).await?;
            if let Some(operator) = processes.operators.iter_mut().find(|o| Some(o.identity()) == leader.as_deref()) {
                operator.restart().await?;
            }
        }
        Fault::KillWebhook => processes.operators[1].restart().await?,
        Fault::RestartApiServer => drop(processes.cluster.restart_apiserver().await?),
        Fault::RestartEtcd => drop(processes.cluster.restart_etcd().await?),
        Fault::UnplugRefused => {
            let message = "internal error: unable to execute QEMU command 'device_del': Bus 'scsi0.0' does not \
                           support hotplugging";
            lab.kubevirt.set_unplug_failure(Some(UnplugFailure::Libvirt(message.into())));
            tokio::time::sleep(pause).await;
            lab.kubevirt.set_unplug_failure(None);
        }
        Fault::SlowUnplug => {
            lab.kubevirt.set_unplug_delay(pause);
            tokio::time::sleep(pause * 2).await;
            lab.kubevirt.set_unplug_delay(crate::kubevirt_lab::DEFAULT_UNPLUG_DELAY);
        }
        Fault::StaleLeader => {
            let leader = leader(&lab.admin).await?;
            if let Some(operator) = processes.operators.iter().find(|o| Some(o.identity()) == leader.as_deref()) {
                let pid = nix::unistd::Pid::from_raw(operator.pid() as i32);
                nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP)?;
                tokio::time::sleep(pause * 2).await;
                nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT)?;
            }
        }
        Fault::GuestReboot => {
            let began = SystemTime::now();
            lab.guest.reboot().await?;
            lab.resets.lock().unwrap().push((began, SystemTime::now()));
        }
    }
    Ok(())
}

/// The identity that holds the operators' lease, if any.
async fn leader(admin: &kube::Client) -> Result<Option<String>> {
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(admin.clone(), "wukong-system");
    let lease = retry(|| leases.get_opt("wukong-operator")).await?;
    Ok(lease.and_then(|l| l.spec?.holder_identity))
}

/// Retries a read while the API server or etcd restarts.
async fn retry<T, F, Fut>(read: F) -> Result<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = kube::Result<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match read().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("retrying a read: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Waits until every object is at its spec, the guest agreeing: a Wukong disk listed is Attached and present in
/// the guest; unlisted, it is gone from status and guest, unless a writer holds it (then DetachBlocked, naming the
/// writer, and still in the guest) and it was not forced. A user disk is in the guest exactly while it is in the
/// VM's template, and a removal refused for a writer leaves it there. Also updates what the soak knows from the
/// Wukong's spec and the user VM's template (a write that failed, a removal allowed or not).
async fn converge(lab: &Lab, disks: &mut [Disk]) -> Result<()> {
    let deadline = Instant::now() + CONVERGENCE_BOUND;
    let mut last;
    loop {
        last = at_spec(lab, disks).await;
        match &last {
            Ok(true) => return Ok(()),
            Ok(false) | Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(500)).await,
            _ => break,
        }
    }
    let seen = describe(lab, disks).await;
    match last {
        Err(e) => Err(e.context(seen)),
        Ok(_) => Err(anyhow::anyhow!("{seen}")),
    }
}

/// Whether everything is at its spec now (see [`converge`]).
async fn at_spec(lab: &Lab, disks: &mut [Disk]) -> Result<bool> {
    let wukong = lab.wukongs.get(WUKONG).await?;
    // Not before the operator has seen the spec as it is now.
    if wukong.status.as_ref().and_then(|s| s.observed_generation) != wukong.metadata.generation {
        return Ok(false);
    }
    let vm = serde_json::to_value(lab.vms.get(USER_VM).await?)?;
    let template = template_volumes(&vm);
    let agent = lab.guest.agent();
    for disk in disks.iter_mut() {
        let in_guest = !gone(presence(&agent, disk.name).await?);
        let held = disk.writer.is_some() && !disk.forced;
        let ok = match disk.owner {
            Owner::Wukong => {
                // As the spec has it: a write that failed (the API server restarting) may or may not have landed.
                disk.wanted = wukong.spec.disks.iter().any(|d| d.name == disk.name);
                let status = volume(&wukong, disk.name);
                match (disk.wanted, held) {
                    (true, _) => status.is_some_and(|v| v.phase == Phase::Attached) && in_guest,
                    (false, false) => status.is_none() && !in_guest,
                    (false, true) => status.is_some_and(|v| v.phase == Phase::DetachBlocked) && in_guest,
                }
            }
            Owner::User => {
                disk.wanted = template.iter().any(|v| v == disk.name);
                disk.wanted == in_guest
            }
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Disk `serial`'s state in the guest, `None` when the guest does not have it (an agent that does not answer is an
/// error, not an absence).
async fn presence(agent: &AgentClient, serial: &str) -> Result<Option<DiskState>> {
    match agent.get_disk(serial, false).await {
        Ok(disk) => Ok(Some(disk.state())),
        Err(e) if e.code() == Some(tonic::Code::NotFound) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("asking the agent about disk {serial}")),
    }
}

/// Whether a disk in that state is out of the guest's hands: absent, or released (the agent keeps a released disk's
/// record, SCSI-deleted, until it is plugged again).
fn gone(state: Option<DiskState>) -> bool {
    matches!(state, None | Some(DiskState::Released))
}

/// What the soak sees, for a convergence that did not come.
async fn describe(lab: &Lab, disks: &[Disk]) -> String {
    let wukong = lab.wukongs.get(WUKONG).await.map(|w| w.status);
    let agent = lab.guest.agent();
    let mut seen = format!("Wukong status: {wukong:?}\n");
    for disk in disks {
        let state = agent.get_disk(disk.name, false).await.map(|d| d.state());
        seen.push_str(&format!("{disk:?}: in the guest {state:?}\n"));
    }
    seen
}

/// The invariants that are not convergence; each broken one is returned as a sentence.
async fn check(lab: &Lab, disks: &mut [Disk], report: &mut Report) -> Result<Vec<String>> {
    let mut violations = Vec::new();
    let agent = lab.guest.agent();
    // Zero unsafe unplugs, but for those forced, and nothing forced without a Warning Event.
    let unplugs = lab.kubevirt.unsafe_unplugs();
    let new = unplugs.get(report.examined..).unwrap_or_default();
    report.examined = unplugs.len();
    report.checked_unplugs = lab.kubevirt.checked_unplugs();
    let events = events(&lab.admin, NS).await?;
    let warned = |volume: &str| {
        events.iter().any(|e| {
            let note = e.data["note"].as_str().unwrap_or_default();
            let reason = &e.data["reason"];
            (reason == "ForcedDetach" || reason == "ForcedUnplug") && note.contains(&format!("'{volume}'"))
        })
    };
    let resetting = |at: SystemTime| {
        // The oracle waits up to 10 s for the guest's shell.
        let asked = at + Duration::from_secs(11);
        lab.resets.lock().unwrap().iter().any(|(began, ended)| *began <= asked && at <= *ended)
    };
    for unplug in new {
        let disk = disks.iter().find(|d| d.name == unplug.volume);
        let unasked = unplug.held_by.iter().all(|h| h.starts_with("the oracle could not ask the guest"));
        if unasked && resetting(unplug.at) {
            report.unjudged_unplugs += 1;
            continue;
        }
        if disk.is_some_and(|d| d.forced) {
            report.forced_unplugs += 1;
            if !warned(&unplug.volume) {
                violations.push(format!("{} was forced out without a Warning Event", unplug.volume));
            }
        } else {
            violations.push(format!("an unsafe unplug: {unplug:?}"));
        }
    }
    // A disk gone from the guest was unmounted by its release (or forced out); one detached without preserveData
    // comes back as a new blank claim.
    for disk in disks.iter_mut().filter(|d| !d.wanted && d.writer.is_none()) {
        if gone(presence(&agent, disk.name).await?) {
            disk.mounted = disk.mounted && disk.forced;
            if disk.owner == Owner::Wukong && !disk.preserve {
                disk.checksum = None;
            }
        }
    }
    // A forced disk's data is the user's loss to take; a stale mount of it is cleared for the next round.
    for disk in disks.iter_mut().filter(|d| d.forced && !d.wanted) {
        if let Some(pid) = disk.writer.take() {
            lab.guest.stop_process(&pid).await?;
        }
        if disk.mounted {
            // Unless the guest already dropped it (a reset, or the kernel when its device went away).
            let mnt = disk.mnt();
            lab.guest.run_ok(&format!("if grep -q ' {mnt} ' /proc/mounts; then umount -l {mnt}; fi")).await?;
            disk.mounted = false;
        }
        disk.checksum = None;
    }
    // A forced removal that did not happen (refused, or the API server away) is no longer pending.
    for disk in disks.iter_mut().filter(|d| d.wanted) {
        disk.forced = false;
    }
    // What is mounted where, as the guest has it: a detach that the spec took back in the same round unmounted a
    // disk the soak had mounted, and a give-back (CancelDetach) mounts a disk again. A listed disk unmounted
    // otherwise, or under a writer, stays for the checks below to report.
    let table = lab.guest.run_ok("cat /proc/mounts").await?;
    for disk in disks.iter_mut() {
        let here = format!(" {} ", disk.mnt());
        match (disk.mounted, table.lines().any(|l| l.contains(&here))) {
            (true, false) if disk.unlisted && disk.writer.is_none() => {
                disk.mounted = false;
                if disk.owner == Owner::Wukong && !disk.preserve {
                    disk.checksum = None;
                }
            }
            (false, true) => disk.mounted = true,
            _ => {}
        }
    }
    // Every checksum intact where the disk is mounted (the others are checked when they are mounted again).
    for disk in disks.iter().filter(|d| d.mounted) {
        if let Some(sum) = &disk.checksum {
            match lab.guest.checksum(&format!("{}/data", disk.mnt())).await {
                Ok(now) if &now == sum => {}
                Ok(now) => violations.push(format!("the data on {} changed: {sum} became {now}", disk.name)),
                Err(e) => {
                    violations.push(format!("the data on {} cannot be read where it was mounted: {e:#}", disk.name))
                }
            }
        }
    }
    // No listed disk left released in the guest (the state is read after convergence, past the guard's grace).
    for disk in disks.iter().filter(|d| d.wanted) {
        match agent.get_disk(disk.name, false).await.map(|d| d.state()) {
            Ok(DiskState::Released) => {
                violations.push(format!("{} is released in the guest while it is in the spec", disk.name))
            }
            Ok(_) => {}
            Err(e) => violations.push(format!("{} is in the spec but not in the guest: {e}", disk.name)),
        }
    }
    // No claim deleted that preserveData kept: an unlisted Wukong disk's claim is still there.
    let claims: Api<DynamicObject> = Api::namespaced_with(
        lab.admin.clone(),
        NS,
        &resource("PersistentVolumeClaim", "", "v1", "persistentvolumeclaims"),
    );
    for disk in disks.iter().filter(|d| d.owner == Owner::Wukong && d.preserve && d.checksum.is_some()) {
        let claim = claims.get_opt(&format!("{WUKONG_VM}-{}", disk.name)).await?;
        if claim.is_none_or(|c| c.metadata.deletion_timestamp.is_some()) {
            violations.push(format!("the claim of {} is gone although preserveData kept it", disk.name));
        }
    }
    Ok(violations)
}

/// Mounts every plugged disk the soak does not have mounted: a disk whose data it knows is checked; a new one gets
/// a filesystem and data, synced, whose checksum it keeps.
async fn settle(lab: &Lab, disks: &mut [Disk]) -> Result<Vec<String>> {
    let mut violations = Vec::new();
    let agent = lab.guest.agent();
    for disk in disks.iter_mut().filter(|d| d.wanted && !d.mounted) {
        // One the guest does not have (or has released: its device node is stale) is a convergence already reported.
        let Ok(found) = agent.get_disk(disk.name, false).await else { continue };
        if found.state() != DiskState::Present {
            continue;
        }
        let dev = found.dev_node;
        let mnt = disk.mnt();
        match &disk.checksum {
            Some(sum) => {
                let mounted = lab.guest.run_ok(&format!("mkdir -p {mnt} && mount {dev} {mnt}")).await;
                let now = match mounted {
                    Ok(_) => lab.guest.checksum(&format!("{mnt}/data")).await,
                    Err(e) => Err(e),
                };
                match now {
                    Ok(now) if &now == sum => {}
                    Ok(now) => violations.push(format!("the data on {} changed: {sum} became {now}", disk.name)),
                    Err(e) => {
                        violations.push(format!(
                            "the data kept on {} cannot be read: {}",
                            disk.name,
                            short(&e.to_string())
                        ));
                        // Counted once: the disk gets new data in the next round.
                        disk.checksum = None;
                        continue;
                    }
                }
            }
            None => {
                // The agent names this device for a disk new to the guest: a mount of that device node is another
                // disk's (a kernel name reused while a stale mount held the old one) or a misnamed disk. Either is
                // recorded with the guest's mount, and the run goes on.
                let held = lab.guest.run(&format!("grep '^{dev} ' /proc/mounts")).await?;
                if held.status == 0 {
                    violations.push(format!(
                        "the agent names {dev} for {}, which the guest has mounted: {}",
                        disk.name,
                        held.output.trim()
                    ));
                    continue;
                }
                let sum = lab.guest.fill(&dev, &mnt, DATA_BYTES).await?;
                lab.guest.run_ok("sync").await?;
                disk.checksum = Some(sum);
            }
        }
        disk.mounted = true;
        disk.unlisted = false;
    }
    Ok(violations)
}

/// The start of a long message (an API server's denial repeats itself), for the soak's log.
fn short(message: &str) -> &str {
    let end = message.char_indices().nth(240).map_or(message.len(), |(i, _)| i);
    &message[..end]
}

/// A seed from the clock, for a run not told one.
pub fn fresh_seed() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
}
