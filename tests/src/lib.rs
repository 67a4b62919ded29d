//! The guest lab: a real Linux guest under QEMU (TCG), with the freshly built agent, disks hot-plugged over QMP,
//! and a test-only control channel to run commands inside it. A guest can have a vsock device and no network at all
//! ([`GuestOptions`]): this machine's kernel has no `vhost_vsock`, so the device is QEMU's `vhost-user-vsock-pci`
//! served by rust-vmm's userspace `vhost-device-vsock`, which the host reaches over "hybrid vsock" (a Unix socket,
//! [`Guest::vsock_socket`]).
//!
//! Nothing here is skipped when something is missing: a lab that cannot start fails the test with the reason.

pub mod cdi_lab;
pub mod cluster;
pub mod helm;
pub mod kubevirt_crds;
pub mod kubevirt_lab;
pub mod kubevirt_vsock;
pub mod kubevirt_webhooks;
pub mod lab_events;
pub mod lab_pod;
pub mod node;
pub mod operator_lab;
pub mod pki;
pub mod ports;
pub mod process;
pub mod readme_install;
pub mod snapshot_lab;
pub mod soak;
pub mod storage_lab;
pub mod unplug_oracle;

use anyhow::{Context, Result, bail, ensure};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use wukong_controller_client::agent_client::{AgentAddress, AgentClient, TlsFiles};
use wukong_controller_client::qmp::{DiskDevice, DiskPlug, QmpClient};

use crate::process::Lab;

/// Port the agent listens on inside the guest (TCP and vsock).
const GUEST_AGENT_PORT: u16 = 7443;
/// Port of the control channel inside the guest (TCP and vsock).
const GUEST_CONTROL_PORT: u16 = 2323;
/// The CID of a guest's vsock device. Each guest has a device (and a backend) of its own, reached through its own
/// socket, so they need not differ; 3 is the first CID a guest may have.
const GUEST_CID: u32 = 3;
/// How long one hybrid-vsock CONNECT may wait for its answer: one sent before the guest's driver is up is never
/// answered, so callers retry.
const VSOCK_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Time allowed for the guest to boot under TCG (it takes 5–15 s; CI machines can be slower).
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a booted guest's vsock control channel may take to answer its first CONNECT (its listener starts just
/// before the guest says it is ready: well under a second).
const VSOCK_AFTER_BOOT: Duration = Duration::from_secs(30);
/// systemd, udev and cloud-init's first stages under TCG.
const SYSTEMD_BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// What a guest prints on its console once booted (the agent started, the control channel up).
const READY_MARKER: &str = "WUKONG-LAB-READY";
/// How long a restarted agent may take to answer.
const AGENT_START_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a command run in the guest may take.
const GUEST_COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// PCIe root ports for virtio-blk hot-plug (the root bus of q35 and of aarch64's `virt` cannot hot-plug).
const ROOT_PORTS: u32 = 4;

/// A lab controller's loop, until its task is aborted: `sync` once, then again on every change of `resources`
/// (watched cluster-wide as `client`) and at least every `resync`. A failed pass is logged and tried on the next
/// one, as a controller requeues.
pub async fn resync_loop<F, Fut>(
    what: &str,
    client: &kube::Client,
    resources: Vec<kube::api::ApiResource>,
    resync: Duration,
    mut sync: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, watcher};
    let watches = resources.iter().map(|r| {
        let api = kube::Api::<kube::api::DynamicObject>::all_with(client.clone(), r);
        watcher(api, watcher::Config::default()).default_backoff().map(drop).boxed()
    });
    let mut changes = futures::stream::select_all(watches);
    loop {
        if let Err(e) = sync().await {
            tracing::debug!(error = %e, "{what}: will retry");
        }
        let _ = tokio::time::timeout(resync, changes.next()).await;
        tokio::task::yield_now().await;
    }
}

/// Polls `check` every 100 ms until it yields a value, for at most `timeout`; the error names `what` was awaited and
/// the last thing `check` saw.
pub async fn until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<std::result::Result<T, String>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match check().await? {
            Ok(value) => return Ok(value),
            Err(seen) if Instant::now() > deadline => {
                bail!("{what} did not happen within {timeout:?}; last seen: {seen}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Workspace root (the parent of this crate).
/// The median of benchmark samples (the upper one of an even count).
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

/// A duration in milliseconds, for benchmark samples.
pub fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("crate has a parent").to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"))
}

/// The `wukongctl` of this build profile: `cargo test --workspace` builds it, `scripts/demo.sh` too. `WUKONGCTL`
/// overrides.
pub fn wukongctl_binary() -> PathBuf {
    std::env::var_os("WUKONGCTL").map(PathBuf::from).unwrap_or_else(|| profile_binary("wukongctl"))
}

/// The `wukong-operator` of this build profile (`cargo test --workspace` builds it).
pub fn operator_binary() -> PathBuf {
    profile_binary("wukong-operator")
}

fn profile_binary(name: &str) -> PathBuf {
    let profile = if cfg!(debug_assertions) { "debug" } else { "release" };
    target_dir().join(profile).join(name)
}

/// The agent binary put into the (x86_64) guest: `$WUKONG_AGENT_BIN`, or the release build for guests (glibc 2.17,
/// built by `scripts/lib/build-guest-agent.sh`), the binary users download.
pub fn agent_binary() -> PathBuf {
    agent_binary_for(Arch::X86_64)
}

/// The agent binary put into a guest of `arch`: the release build for guests of that architecture (glibc 2.17,
/// built by `scripts/lib/build-guest-agent.sh`); `$WUKONG_AGENT_BIN` overrides the x86_64 one.
pub fn agent_binary_for(arch: Arch) -> PathBuf {
    match (arch, std::env::var_os("WUKONG_AGENT_BIN")) {
        (Arch::X86_64, Some(path)) => PathBuf::from(path),
        _ => target_dir().join(format!("{}-unknown-linux-gnu/release/wukong-agent", arch.name())),
    }
}

/// A guest's architecture. Both are emulated (TCG); an aarch64 guest boots in 10 to 15 s here, twice as long as an
/// x86_64 one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Arch {
    /// The host's: a q35 machine with Debian's cloud kernel.
    #[default]
    X86_64,
    /// An arm64 `virt` machine with Debian's arm64 kernel and userland (scripts/lab/build-guest.sh's aarch64
    /// profile A: no vsock, LVM or md tools).
    Aarch64,
}

impl Arch {
    /// As Rust's and the kernel's targets say it, and as scripts/lab/build-guest.sh takes it.
    pub fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }

    fn qemu(self) -> &'static str {
        match self {
            Arch::X86_64 => "qemu-system-x86_64",
            Arch::Aarch64 => "qemu-system-aarch64",
        }
    }

    fn machine(self) -> &'static str {
        match self {
            Arch::X86_64 => "q35",
            Arch::Aarch64 => "virt",
        }
    }

    /// `-cpu`: the emulator's fullest CPU. On aarch64 with QEMU's own pointer-authentication algorithm instead of
    /// the architected QARMA5, which costs TCG much time for every signed return.
    fn cpu(self) -> &'static str {
        match self {
            Arch::X86_64 => "max",
            Arch::Aarch64 => "max,pauth-impdef=on",
        }
    }

    /// The serial console: the 16550's, or the `virt` machine's PL011.
    fn console(self) -> &'static str {
        match self {
            Arch::X86_64 => "ttyS0",
            Arch::Aarch64 => "ttyAMA0",
        }
    }
}

/// Kernel and initramfs of the guest.
#[derive(Debug, Clone)]
pub struct Assets {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// Runs `script` when `product` is missing or older than `newer_than` or the lab scripts. The check and the build
/// both run under the lab's lock: test binaries share the images, and a guest (or a node) must never start from a
/// half-written one.
fn build_if_stale(product: &Path, newer_than: Option<&Path>, script: &str, args: &[&Path]) -> Result<()> {
    let dir = target_dir().join("wukong-lab");
    std::fs::create_dir_all(&dir)?;
    let scripts = workspace_root().join("scripts");
    let status = std::process::Command::new("flock")
        .arg(dir.join(".lock"))
        .arg("bash")
        .arg("-c")
        .arg(
            r#"set -e; product="$1"; scripts="$2"; script="$3"; newer="$4"; shift 4
               if [ ! -f "$product" ] || { [ -n "$newer" ] && [ "$newer" -nt "$product" ]; } \
                  || [ -n "$(find "$scripts/lab" "$scripts/lib" -newer "$product" -print -quit)" ]; then
                 bash "$scripts/lab/$script" "$@"
               fi"#,
        )
        .arg("build-if-stale")
        .arg(product)
        .arg(&scripts)
        .arg(script)
        .arg(newer_than.map(Path::as_os_str).unwrap_or_default())
        .args(args)
        .status()
        .context("cannot run flock")?;
    if !status.success() {
        bail!("building {} failed (scripts/lab/{script}); see the messages above", product.display());
    }
    Ok(())
}

/// Builds the guest image (profile A) if it is missing or older than the agent or the lab scripts.
pub fn assets() -> Result<&'static Assets> {
    assets_for(Arch::X86_64)
}

/// Builds the guest image (profile A) of `arch` if it is missing or older than its agent or the lab scripts: the
/// host's in target/wukong-lab, an aarch64 guest's in target/wukong-lab/aarch64.
pub fn assets_for(arch: Arch) -> Result<&'static Assets> {
    static X86_64: OnceLock<Assets> = OnceLock::new();
    static AARCH64: OnceLock<Assets> = OnceLock::new();
    let (assets, dir) = match arch {
        Arch::X86_64 => (&X86_64, target_dir().join("wukong-lab")),
        Arch::Aarch64 => (&AARCH64, target_dir().join("wukong-lab/aarch64")),
    };
    if let Some(a) = assets.get() {
        return Ok(a);
    }
    let agent = agent_binary_for(arch);
    if !agent.exists() {
        bail!(
            "the {} agent binary {} does not exist; run `scripts/lib/build-guest-agent.sh` first",
            arch.name(),
            agent.display()
        );
    }
    let arch_arg = Path::new(arch.name());
    build_if_stale(&dir.join("initrd.img"), Some(&agent), "build-guest.sh", &[&dir, &agent, arch_arg])?;
    Ok(assets.get_or_init(|| Assets { kernel: dir.join("vmlinuz"), initrd: dir.join("initrd.img") }))
}

/// Profile B: the kernel, the loader initramfs and the root filesystem image of the systemd guest.
#[derive(Debug, Clone)]
pub struct SystemdAssets {
    pub kernel: PathBuf,
    pub loader: PathBuf,
    pub root: PathBuf,
}

/// Builds the systemd guest (profile B) if it is missing or older than the lab scripts.
pub fn systemd_assets() -> Result<&'static SystemdAssets> {
    static ASSETS: OnceLock<SystemdAssets> = OnceLock::new();
    if let Some(a) = ASSETS.get() {
        return Ok(a);
    }
    let lab = target_dir().join("wukong-lab");
    let dir = lab.join("systemd");
    build_if_stale(&dir.join("root.img"), None, "build-systemd-guest.sh", &[&lab])?;
    Ok(ASSETS.get_or_init(|| SystemdAssets {
        kernel: dir.join("vmlinuz"),
        loader: dir.join("loader.img"),
        root: dir.join("root.img"),
    }))
}

/// A NoCloud seed (an ISO labelled `cidata`) with this user data, in `dir`.
pub fn nocloud_seed(dir: &Path, user_data: &str) -> Result<PathBuf> {
    let seed = dir.join("seed");
    std::fs::create_dir_all(&seed)?;
    std::fs::write(seed.join("user-data"), user_data)?;
    std::fs::write(seed.join("meta-data"), "instance-id: wukong-lab-b\nlocal-hostname: wukong-lab-b\n")?;
    let iso = dir.join("seed.iso");
    let out = std::process::Command::new("genisoimage")
        .args(["-quiet", "-output"])
        .arg(&iso)
        .args(["-volid", "cidata", "-joliet", "-rock"])
        .arg(seed.join("user-data"))
        .arg(seed.join("meta-data"))
        .output()
        .context("cannot run genisoimage; run scripts/lib/install-deps.sh")?;
    if !out.status.success() {
        bail!("genisoimage failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(iso)
}

/// An agent on this machine (not in a guest), listening on `listen`, with its own socket and state directory;
/// killed on drop. For tests of what talks to an agent, not of what the agent sees.
pub struct HostAgent {
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl HostAgent {
    /// Starts it with `extra` flags and waits until it listens.
    pub fn start(listen: &str, extra: &[&str]) -> Result<Self> {
        let dir = process::lab_tempdir("wukong-agent-")?;
        let child = std::process::Command::new(agent_binary())
            .args(["--listen", listen, "--socket"])
            .arg(dir.path().join("agent.sock"))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .join()?
            .spawn()
            .context("starting wukong-agent (cargo build --release -p wukong-agent)")?;
        let started = Instant::now();
        while std::net::TcpStream::connect(listen).is_err() {
            anyhow::ensure!(started.elapsed() < Duration::from_secs(20), "wukong-agent never listened on {listen}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Self { child, _dir: dir })
    }
}

impl HostAgent {
    /// Whether the process is still the one started (it did not exit).
    pub fn running(&mut self) -> Result<bool> {
        Ok(self.child.try_wait()?.is_none())
    }
}

impl Drop for HostAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Serves files over HTTP on a loopback port (the guest reaches it at 10.0.2.2:PORT), each at `/` and its file
/// name (anything else is a 404), until dropped.
pub struct FileServer {
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FileServer {
    pub async fn start(files: &[&Path]) -> Result<Self> {
        let mut bodies = std::collections::HashMap::new();
        for file in files {
            let name = file.file_name().and_then(|n| n.to_str()).context("a file name in UTF-8")?;
            bodies.insert(format!("/{name}"), std::sync::Arc::new(std::fs::read(file)?));
        }
        let bodies = std::sync::Arc::new(bodies);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let bodies = bodies.clone();
                tokio::spawn(async move {
                    // Reading up to the end of the headers is all the protocol needs: the path is on the first line.
                    let mut request = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let line = String::from_utf8_lossy(&request);
                    let path = line.split_whitespace().nth(1).unwrap_or_default();
                    let (status, body) = match bodies.get(path) {
                        Some(body) => ("200 OK", body.as_slice()),
                        None => ("404 Not Found", &b""[..]),
                    };
                    let head =
                        format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
                    let _ = stream.write_all(head.as_bytes()).await;
                    let _ = stream.write_all(body).await;
                });
            }
        });
        Ok(Self { port, task })
    }

    /// The URL the guest downloads `file` from.
    pub fn url(&self, file: &Path) -> String {
        format!("http://10.0.2.2:{}/{}", self.port, file.file_name().unwrap_or_default().to_string_lossy())
    }

    /// The URL the host (the lab's CDI, say) downloads `file` from.
    pub fn host_url(&self, file: &Path) -> String {
        format!("http://127.0.0.1:{}/{}", self.port, file.file_name().unwrap_or_default().to_string_lossy())
    }
}

/// The agent's .deb and .rpm as `scripts/package-agent.sh` builds them from `agent_binary()`, with `version`
/// (a newer one makes an upgrade of the same binary), written to `out`.
pub fn agent_packages(out: &Path, version: &str) -> Result<(PathBuf, PathBuf)> {
    let status = std::process::Command::new("bash")
        .arg(workspace_root().join("scripts/package-agent.sh"))
        .args(["--version", version, "--binary"])
        .arg(agent_binary())
        .arg("--out")
        .arg(out)
        .stdout(Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "scripts/package-agent.sh failed: {status}");
    Ok((
        out.join(format!("wukong-agent_{version}_amd64.deb")),
        out.join(format!("wukong-agent-{version}-1.x86_64.rpm")),
    ))
}

/// Output of a command run in the guest.
#[derive(Debug, Clone)]
pub struct GuestOutput {
    /// stdout and stderr, interleaved.
    pub output: String,
    pub status: i32,
}

/// The bus a test disk is plugged into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bus {
    Scsi,
    VirtioBlk,
}

/// A disk to hot-plug.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    pub serial: String,
    pub device_id: Option<String>,
    pub bus: Bus,
    pub size_bytes: u64,
}

impl DiskSpec {
    /// A 64 MiB SCSI disk with this serial.
    pub fn scsi(serial: &str) -> Self {
        Self { serial: serial.into(), device_id: None, bus: Bus::Scsi, size_bytes: 64 << 20 }
    }

    pub fn virtio(serial: &str) -> Self {
        Self { bus: Bus::VirtioBlk, ..Self::scsi(serial) }
    }

    pub fn with_device_id(mut self, id: &str) -> Self {
        self.device_id = Some(id.into());
        self
    }
}

/// A disk plugged into the guest.
#[derive(Debug, Clone)]
pub struct PluggedDisk {
    pub spec: DiskSpec,
    /// QEMU device id.
    pub device: String,
    /// QEMU block node.
    pub node: String,
    pub image: PathBuf,
    /// PCIe root port a virtio-blk disk occupies, given back on unplug.
    root_port: Option<u32>,
}

/// What a profile-A guest is booted with ([`Guest::boot_with_options`]).
#[derive(Debug, Clone)]
pub struct GuestOptions {
    /// A virtio-vsock device (CID [`Guest::vsock_cid`]): QEMU's `vhost-user-vsock-pci` served by
    /// `vhost-device-vsock`, which needs the guest's memory shared with it. The host reaches the guest's ports
    /// through [`Guest::vsock_socket`]; the control channel listens on vsock port 2323 too.
    pub vsock: bool,
    /// A NIC on QEMU's user network, with the agent's and the control channel's ports forwarded to loopback. Without
    /// one (`-nic none`) the guest has only `lo`: it needs `vsock` then, for the control channel.
    pub network: bool,
    /// The agent's `--listen` addresses (the kernel parameter `wukong.listen`). `None`: `0.0.0.0:7443` with a
    /// network, and `vsock://7443` with a vsock device.
    pub agent_listen: Option<Vec<String>>,
    /// More QEMU arguments.
    pub qemu_args: Vec<String>,
    /// The guest's architecture: its kernel, initramfs and agent ([`assets_for`]) and its emulator. An aarch64
    /// guest has no vsock device.
    pub arch: Arch,
}

impl Default for GuestOptions {
    /// What [`Guest::boot`] boots: an x86_64 guest with a network, no vsock.
    fn default() -> Self {
        Self { vsock: false, network: true, agent_listen: None, qemu_args: Vec::new(), arch: Arch::X86_64 }
    }
}

impl GuestOptions {
    fn listen_addresses(&self) -> Vec<String> {
        self.agent_listen.clone().unwrap_or_else(|| {
            let tcp = self.network.then(|| format!("0.0.0.0:{GUEST_AGENT_PORT}"));
            let vsock = self.vsock.then(|| format!("vsock://{GUEST_AGENT_PORT}"));
            tcp.into_iter().chain(vsock).collect()
        })
    }
}

/// The host's loopback ports QEMU forwards to a guest's network.
#[derive(Debug, Clone, Copy)]
struct Forwards {
    agent: u16,
    control: u16,
}

/// A guest's vsock device: the backend serving it (killed on drop) and its hybrid-vsock socket.
struct VsockDevice {
    _backend: Child,
    cid: u32,
    /// Where QEMU connects to the backend (vhost-user).
    vhost: PathBuf,
    /// Where the host connects to the guest (hybrid vsock).
    socket: PathBuf,
}

impl VsockDevice {
    /// Starts `vhost-device-vsock` for a guest whose files are in `dir`, and waits until it listens for QEMU at
    /// `dir/vhost.sock` (QEMU fails to start when nothing is there).
    async fn start(dir: &Path) -> Result<Self> {
        let (vhost, socket) = (dir.join("vhost.sock"), dir.join("vm.vsock"));
        let log = dir.join("vhost-device-vsock.log");
        let mut backend = Command::new(vhost_vsock_binary()?)
            .arg("--vm")
            .arg(format!("guest-cid={GUEST_CID},socket={},uds-path={}", vhost.display(), socket.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .join()?
            .spawn()
            .context("cannot start vhost-device-vsock")?;
        let started = Instant::now();
        while !vhost.exists() {
            if let Some(status) = backend.try_wait()? {
                bail!("vhost-device-vsock exited ({status}): {}", read_lossy(&log));
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(10),
                "vhost-device-vsock did not listen at {} within 10 s: {}",
                vhost.display(),
                read_lossy(&log)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Self { _backend: backend, cid: GUEST_CID, vhost, socket })
    }
}

/// `vhost-device-vsock`, built once per machine by scripts/lib/install-vhost-vsock.sh (under a lock: test binaries
/// start guests at once, and two `cargo install`s into one directory collide).
fn vhost_vsock_binary() -> Result<&'static Path> {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    if let Some(b) = BINARY.get() {
        return Ok(b);
    }
    let tools = target_dir().join("wukong-tools");
    std::fs::create_dir_all(&tools)?;
    let out = std::process::Command::new("flock")
        .arg(tools.join(".lock"))
        .arg("bash")
        .arg(workspace_root().join("scripts/lib/install-vhost-vsock.sh"))
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run flock")?;
    anyhow::ensure!(out.status.success(), "scripts/lib/install-vhost-vsock.sh failed; see the messages above");
    let path = PathBuf::from(String::from_utf8(out.stdout)?.trim());
    Ok(BINARY.get_or_init(|| path))
}

/// Opens a connection to vsock port `port` of the guest behind the hybrid-vsock socket `socket` (vhost-device-vsock's,
/// Firecracker's, Cloud Hypervisor's protocol): `CONNECT <port>\n`, answered `OK <host port>\n`; the Unix stream is
/// then the guest's connection. One try, bounded: a CONNECT the guest cannot answer yet (its driver is not up, or
/// nothing listens on the port) is never answered or is closed.
pub async fn hybrid_vsock_connect(socket: &Path, port: u32) -> Result<tokio::net::UnixStream> {
    let attempt = async {
        let mut stream = tokio::net::UnixStream::connect(socket).await?;
        stream.write_all(format!("CONNECT {port}\n").as_bytes()).await?;
        // Byte by byte: whatever follows the answer's newline is the guest's and must stay in the stream.
        let mut answer = Vec::new();
        while !answer.ends_with(b"\n") {
            let byte = stream.read_u8().await.context("closed before answering")?;
            answer.push(byte);
        }
        let answer = String::from_utf8_lossy(&answer);
        anyhow::ensure!(answer.starts_with("OK "), "answered {answer:?}");
        Ok(stream)
    };
    tokio::time::timeout(VSOCK_CONNECT_TIMEOUT, attempt)
        .await
        .with_context(|| {
            format!("CONNECT {port} through {} was not answered within {VSOCK_CONNECT_TIMEOUT:?}", socket.display())
        })?
        .with_context(|| format!("CONNECT {port} through {}", socket.display()))
}

/// A running guest. Killed when dropped.
pub struct Guest {
    qemu: Child,
    dir: tempfile::TempDir,
    pub qmp: QmpClient,
    /// `None` without a network.
    forwards: Option<Forwards>,
    /// After QEMU, so that the backend outlives its frontend.
    vsock: Option<VsockDevice>,
    /// When QEMU was started.
    launched: Instant,
    /// From QEMU's start to the first CONNECT the guest answered (a vsock guest's boot).
    vsock_ready: Option<Duration>,
    next_disk: AtomicU32,
    free_ports: std::sync::Mutex<Vec<u32>>,
    /// The lab's client certificate once the agent serves mutual TLS ([`Guest::install_agent`]).
    agent_tls: std::sync::Mutex<Option<TlsFiles>>,
}

impl Guest {
    /// Boots a guest (profile A) with a network and no vsock, and waits until its agent is ready.
    pub async fn boot() -> Result<Self> {
        Self::boot_with_options(&GuestOptions::default()).await
    }

    /// Boots a guest (profile A) with extra QEMU arguments, and waits until its agent is ready.
    pub async fn boot_with(qemu_args: &[&str]) -> Result<Self> {
        let qemu_args = qemu_args.iter().map(|a| a.to_string()).collect();
        Self::boot_with_options(&GuestOptions { qemu_args, ..Default::default() }).await
    }

    /// Boots a guest (profile A) as `options` say, and waits until it is ready: with a vsock device, until its
    /// control channel answers a CONNECT (which [`Self::vsock_ready`] measures); with a network, until its agent
    /// answers there. A guest with vsock and no network runs its agent unwatched: the lab has no vsock client of it.
    pub async fn boot_with_options(options: &GuestOptions) -> Result<Self> {
        anyhow::ensure!(options.vsock || options.network, "a guest with neither vsock nor a network cannot be reached");
        anyhow::ensure!(
            !(options.vsock && options.arch == Arch::Aarch64),
            "the aarch64 guest has no vsock device (its image has neither the modules nor socat)"
        );
        let assets = assets_for(options.arch)?;
        let started = Instant::now();
        let append = format!(
            "console={} panic=-1 loglevel=4 wukong.listen={}",
            options.arch.console(),
            options.listen_addresses().join(",")
        );
        let mut guest = Self::launch(&assets.kernel, &assets.initrd, &append, 512, options).await?;
        if guest.vsock.is_some() {
            // Once, under a loaded CI run, a guest that had booted (its console said so at 13 s) never answered a
            // CONNECT through vhost-device-vsock in the next 107 s; neither the guest nor the backend logged a
            // word. The vsock device is the lab's, not ours: such a guest is launched again, once, and said so.
            let mut stream = guest.control_over_vsock().await;
            if let Err(e) = &stream {
                eprintln!("guest lab: launching the guest again: {e:#}");
                guest = Self::launch(&assets.kernel, &assets.initrd, &append, 512, options).await?;
                stream = guest.control_over_vsock().await;
            }
            guest.vsock_ready = Some(guest.launched.elapsed());
            // A whole exchange, so that the guest's handler is not left with an empty script.
            converse(stream?, ":").await?;
        }
        guest.wait_for_console(READY_MARKER, 1, BOOT_TIMEOUT).await?;
        guest.wait_for_agent(AGENT_START_TIMEOUT).await?;
        tracing::info!(secs = started.elapsed().as_secs_f64(), vsock_ready = ?guest.vsock_ready, "guest ready");
        Ok(guest)
    }

    /// The first connection to the control channel of a guest just launched with a vsock device: answered within
    /// [`VSOCK_AFTER_BOOT`] of the guest saying it is ready, or an error with its console and the backend's log.
    async fn control_over_vsock(&self) -> Result<tokio::net::UnixStream> {
        let connect = async {
            self.wait_for_console(READY_MARKER, 1, BOOT_TIMEOUT).await?;
            self.vsock_connect(GUEST_CONTROL_PORT.into(), VSOCK_AFTER_BOOT).await
        };
        connect.await.with_context(|| {
            format!(
                "the guest's vsock control channel never answered; console:\n{}\nvhost-device-vsock's log:\n{}",
                self.console(),
                read_lossy(&self.dir.path().join("vhost-device-vsock.log"))
            )
        })
    }

    /// Boots the systemd guest (profile B) with a NoCloud seed, and waits until systemd has started the lab's
    /// control channel. The agent is whatever cloud-init installs from the seed: wait for it separately. It has a
    /// network and a vsock device (as a KubeVirt VMI with `autoattachVSOCK`), whose driver udev loads as it
    /// would on any distribution: the shipped unit and configuration are served on both.
    pub async fn boot_systemd(seed: &Path) -> Result<Self> {
        let assets = systemd_assets()?;
        let drives = [
            // snapshot: the image stays pristine for the next test.
            format!("file={},format=raw,if=none,id=root,snapshot=on", assets.root.display()),
            format!("file={},format=raw,if=none,id=seed,readonly=on", seed.display()),
        ];
        let mut qemu_args = Vec::new();
        for (drive, id) in drives.iter().zip(["root", "seed"]) {
            qemu_args.extend(["-drive".into(), drive.clone(), "-device".into(), format!("virtio-blk-pci,drive={id}")]);
        }
        let append = "console=ttyS0 panic=-1 loglevel=4 systemd.show_status=0";
        let options = GuestOptions { qemu_args, vsock: true, ..Default::default() };
        let guest = Self::launch(&assets.kernel, &assets.loader, append, 1024, &options).await?;
        guest.wait_for_console(READY_MARKER, 1, SYSTEMD_BOOT_TIMEOUT).await?;
        Ok(guest)
    }

    async fn launch(
        kernel: &Path,
        initrd: &Path,
        append: &str,
        memory_mb: u32,
        options: &GuestOptions,
    ) -> Result<Self> {
        let dir = process::lab_tempdir("wukong-guest-")?;
        let console = dir.path().join("console.log");
        let qmp_path = dir.path().join("qmp.sock");
        // The backend first: QEMU connects to it as it starts.
        let vsock = match options.vsock {
            true => Some(VsockDevice::start(dir.path()).await?),
            false => None,
        };
        let arch = options.arch;
        let mut cmd = Command::new(arch.qemu());
        cmd.args(["-accel", "tcg", "-cpu", arch.cpu(), "-m", &memory_mb.to_string(), "-smp", "1"])
            .args(["-nodefaults", "-no-user-config", "-display", "none", "-vga", "none", "-no-reboot"])
            .arg("-chardev")
            .arg(format!("file,id=ser0,path={}", console.display()))
            .args(["-serial", "chardev:ser0"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
            // A second monitor for the companion under test (wukongctl --qmp): a QMP socket serves one client.
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", dir.path().join("companion.qmp").display()))
            .arg("-kernel")
            .arg(kernel)
            .arg("-initrd")
            .arg(initrd)
            .args(["-append", append])
            .args(["-device", "virtio-scsi-pci,id=scsi0"])
            .args(&options.qemu_args);
        match &vsock {
            // A vhost-user backend maps the guest's memory: it must be shareable (memfd), of the size of -m.
            Some(device) => {
                cmd.arg("-object")
                    .arg(format!("memory-backend-memfd,id=mem,size={memory_mb}M,share=on"))
                    .arg("-machine")
                    .arg(format!("{},memory-backend=mem", arch.machine()))
                    .arg("-chardev")
                    .arg(format!("socket,id=vsk,path={}", device.vhost.display()))
                    .args(["-device", "vhost-user-vsock-pci,chardev=vsk"]);
            }
            None => {
                cmd.args(["-machine", arch.machine()]);
            }
        }
        for port in 1..=ROOT_PORTS {
            cmd.arg("-device").arg(format!("pcie-root-port,id=rp{port},bus=pcie.0,chassis={port}"));
        }
        let forwards = match options.network {
            true => {
                let forwards = Forwards { agent: ports::free_port()?, control: ports::free_port()? };
                cmd.arg("-netdev")
                    .arg(format!(
                        "user,id=n0,hostfwd=tcp:127.0.0.1:{}-:{GUEST_AGENT_PORT},\
                         hostfwd=tcp:127.0.0.1:{}-:{GUEST_CONTROL_PORT}",
                        forwards.agent, forwards.control
                    ))
                    .args(["-device", "virtio-net-pci,netdev=n0,romfile="]);
                Some(forwards)
            }
            false => {
                cmd.args(["-nic", "none"]);
                None
            }
        };
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("qemu.log"))?)
            .kill_on_drop(true);
        let qemu = cmd
            .join()?
            .spawn()
            .with_context(|| format!("cannot start {}; run scripts/lib/install-deps.sh", arch.qemu()))?;

        let launched = Instant::now();
        let qmp = loop {
            match QmpClient::connect(&qmp_path).await {
                Ok(q) => break q,
                Err(_) if launched.elapsed() < Duration::from_secs(10) => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => bail!(
                    "QEMU's QMP socket never came up: {e}; qemu.log: {}",
                    read_lossy(&dir.path().join("qemu.log"))
                ),
            }
        };
        Ok(Self {
            qemu,
            dir,
            qmp,
            forwards,
            vsock,
            launched,
            vsock_ready: None,
            next_disk: AtomicU32::new(0),
            free_ports: std::sync::Mutex::new((1..=ROOT_PORTS).rev().collect()),
            agent_tls: std::sync::Mutex::new(None),
        })
    }

    /// Everything the guest printed on its serial console so far.
    pub fn console(&self) -> String {
        read_lossy(&self.dir.path().join("console.log"))
    }

    /// Waits until the console has printed `marker` `times` times in all (the console log spans reboots).
    async fn wait_for_console(&self, marker: &str, times: usize, timeout: Duration) -> Result<()> {
        let started = Instant::now();
        loop {
            if self.console().matches(marker).count() >= times {
                return Ok(());
            }
            // QEMU exits when the guest panics (-no-reboot), and its monitor with it: no use waiting on.
            if let Err(e) = self.qmp.execute("query-status", None).await {
                bail!(
                    "QEMU's monitor stopped answering ({e}) before the guest printed {marker:?}; qemu.log: {}; \
                     console:\n{}",
                    read_lossy(&self.dir.path().join("qemu.log")),
                    self.console()
                );
            }
            if started.elapsed() > timeout {
                bail!(
                    "the guest did not print {marker:?} (time {times}) within {timeout:?}; console:\n{}",
                    self.console()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The guest has disk `serial` and has not released it for an unplug.
    pub async fn has_disk(&self, serial: &str) -> bool {
        self.agent().get_disk(serial, false).await.is_ok_and(|d| d.state() != wukong_proto::v1::DiskState::Released)
    }

    /// Waits until disk `serial` is unplugged (gone, or released for an unplug), polling every 50 ms.
    pub async fn wait_unplugged(&self, serial: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while self.has_disk(serial).await {
            anyhow::ensure!(Instant::now() < deadline, "disk {serial} was not unplugged within {timeout:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Waits until the agent answers over the network.
    pub async fn wait_for_agent(&self, timeout: Duration) -> Result<()> {
        let started = Instant::now();
        loop {
            let client = self.agent().with_call_timeout(Duration::from_secs(2));
            match client.agent_info().await {
                Ok(_) => return Ok(()),
                Err(e) if started.elapsed() > timeout => {
                    let log = self.run("cat /var/log/wukong-agent.log").await.map(|o| o.output).unwrap_or_default();
                    bail!("the agent did not answer within {timeout:?}: {e}; agent log:\n{log}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    fn forwards(&self) -> Forwards {
        self.forwards.expect("a guest booted without a network has no forwarded ports (GuestOptions::network)")
    }

    /// The loopback port the guest agent's port is forwarded to (a guest with a network).
    pub fn agent_port(&self) -> u16 {
        self.forwards().agent
    }

    /// Where the host reaches the guest's agent: its forwarded TCP port, or, for a guest without a network, its
    /// vsock port through the hybrid-vsock socket.
    pub fn agent_address(&self) -> AgentAddress {
        match (self.forwards, &self.vsock) {
            (Some(forwards), _) => AgentAddress::Tcp(format!("http://127.0.0.1:{}", forwards.agent)),
            (None, Some(device)) => {
                AgentAddress::HybridVsock { path: device.socket.clone(), port: u32::from(GUEST_AGENT_PORT) }
            }
            (None, None) => unreachable!("a guest has a network or a vsock device (GuestOptions)"),
        }
    }

    fn vsock_device(&self) -> &VsockDevice {
        self.vsock.as_ref().expect("the guest was booted without a vsock device (GuestOptions::vsock)")
    }

    /// Whether the guest has a vsock device.
    pub fn has_vsock(&self) -> bool {
        self.vsock.is_some()
    }

    /// The host end of the guest's vsock device, a Unix socket speaking hybrid vsock ([`hybrid_vsock_connect`]). A
    /// guest's connection to host CID 2, port P arrives at a listener on the Unix socket named like it with `_P`
    /// appended.
    pub fn vsock_socket(&self) -> PathBuf {
        self.vsock_device().socket.clone()
    }

    /// The guest's own CID.
    pub fn vsock_cid(&self) -> u32 {
        self.vsock_device().cid
    }

    /// How long after QEMU started the guest first answered a CONNECT (its control channel's), for a vsock guest.
    pub fn vsock_ready(&self) -> Option<Duration> {
        self.vsock_ready
    }

    /// A connection to the guest's vsock port `port`, retried until `timeout` ([`vsock_connect_within`]).
    pub async fn vsock_connect(&self, port: u32, timeout: Duration) -> Result<tokio::net::UnixStream> {
        vsock_connect_within(&self.vsock_device().socket, port, timeout).await
    }

    /// A client of the guest's agent.
    pub fn agent(&self) -> AgentClient {
        let tls = self.agent_tls.lock().unwrap().clone();
        AgentClient::connect_with(self.agent_address(), tls.as_ref()).expect("the lab's agent address is valid")
    }

    /// Installs files into the guest (host file → guest path) and restarts its agent with `args` (`--config
    /// /etc/wukong-agent/agent.toml`, say), as an install in a real guest does; later restarts keep `args` (they
    /// replace /etc/wukong-agent.args), until a [`Self::reboot`]. With `client`, the lab's own connections
    /// (`agent()`) then use mutual TLS with those files.
    pub async fn install_agent(&self, files: &[(&Path, &str)], args: &str, client: Option<TlsFiles>) -> Result<()> {
        let mut script = String::new();
        let mut write = |to: &str, text: &str| {
            let dir = Path::new(to).parent().and_then(Path::to_str).unwrap_or("/");
            script.push_str(&format!("mkdir -p {dir}\ncat > {to} <<'WUKONG-FILE'\n{text}\nWUKONG-FILE\n"));
        };
        for (from, to) in files {
            write(to, &std::fs::read_to_string(from).with_context(|| from.display().to_string())?);
        }
        write("/etc/wukong-agent.args", args);
        self.run_ok(&script).await?;
        self.stop_agent("TERM").await?;
        *self.agent_tls.lock().unwrap() = client;
        self.start_agent().await
    }

    /// Forwards `address`:7443 on the host to the guest's agent too (QEMU's `hostfwd_add`), where Pods on the lab's
    /// node reach it: a VMI that reports `address` as its pod network's IP is then reached as in a cluster.
    pub async fn forward_agent(&self, address: std::net::Ipv4Addr) -> Result<()> {
        anyhow::ensure!(self.forwards.is_some(), "a guest without a network has nothing to forward");
        let rule = format!("hostfwd_add n0 tcp:{address}:{GUEST_AGENT_PORT}-:{GUEST_AGENT_PORT}");
        let reply = self.qmp.execute("human-monitor-command", Some(serde_json::json!({"command-line": rule}))).await?;
        let said = reply.as_str().unwrap_or_default();
        anyhow::ensure!(said.trim().is_empty(), "QEMU refused to forward {address}:{GUEST_AGENT_PORT}: {said}");
        Ok(())
    }

    /// A handle on the guest's control channel, for whatever must run commands in the guest without borrowing it.
    pub fn shell(&self) -> GuestShell {
        let route = match (self.forwards, &self.vsock) {
            (Some(forwards), _) => ControlRoute::Tcp(forwards.control),
            (None, Some(device)) => ControlRoute::Vsock(device.socket.clone()),
            (None, None) => unreachable!("a guest has a network or a vsock device (GuestOptions)"),
        };
        GuestShell { route }
    }

    /// Runs a shell script in the guest ([`GuestShell::run`]).
    pub async fn run(&self, script: &str) -> Result<GuestOutput> {
        self.shell().run(script).await
    }

    /// Runs a script that must succeed; returns its output ([`GuestShell::run_ok`]).
    pub async fn run_ok(&self, script: &str) -> Result<String> {
        self.shell().run_ok(script).await
    }

    /// Makes an ext4 filesystem on `dev`, mounts it at `mnt` and writes `bytes` of random data to `mnt/data`
    /// without any sync; returns the data's SHA-256.
    /// Starts a process in the guest that holds a file open under `mnt` (a writer, as a database is): its pid.
    pub async fn start_writer(&self, mnt: &str) -> Result<String> {
        let script = format!("sh -c 'exec 3>>{mnt}/log; exec sleep 1000' </dev/null >/dev/null 2>&1 & echo $!");
        Ok(self.run_ok(&script).await?.trim().to_string())
    }

    /// Stops process `pid` in the guest and waits until it is gone.
    pub async fn stop_process(&self, pid: &str) -> Result<()> {
        self.run_ok(&format!("kill {pid}; while kill -0 {pid} 2>/dev/null; do usleep 50000; done")).await.map(drop)
    }

    pub async fn fill(&self, dev: &str, mnt: &str, bytes: u64) -> Result<String> {
        self.run_ok(&format!(
            "mkfs.ext4 -q {dev} && mkdir -p {mnt} && mount {dev} {mnt} && head -c {bytes} /dev/urandom > {mnt}/data"
        ))
        .await?;
        self.checksum(&format!("{mnt}/data")).await
    }

    /// The SHA-256 of a file in the guest.
    pub async fn checksum(&self, path: &str) -> Result<String> {
        let out = self.run_ok(&format!("sha256sum {path}")).await?;
        Ok(out.split_whitespace().next().context("sha256sum printed nothing")?.to_string())
    }

    /// Starts a process named like udev's blkid probe that opens `dev` as soon as `mnt` is unmounted and holds it
    /// until killed (its pid is in /tmp/probe/pid; /tmp/probe/held exists once it holds the disk): to the agent, a
    /// udev probe that never ends. It looks at the mount table every 5 ms with busybox sh's builtins only (`read -t`
    /// on a FIFO nobody writes is its sleep): a loop that forked `grep` and `sleep` took tens of milliseconds a turn
    /// in the emulated guest of a loaded CI run, and once let a release finish before the probe held the disk.
    pub async fn probe_after_unmount(&self, dev: &str, mnt: &str) -> Result<()> {
        let script = format!(
            r#"echo $$ >/tmp/probe/pid
exec 4<>/tmp/probe/tick
while :; do
  m=
  while read -r _ p _; do [ "$p" = "{mnt}" ] && m=1; done </proc/mounts
  [ -z "$m" ] && break
  read -t 0.005 x <&4
done
exec 3<{dev}
: >/tmp/probe/held
read x </tmp/probe/never
"#
        );
        self.run_ok(&format!(
            "mkdir -p /tmp/probe && rm -f /tmp/probe/never /tmp/probe/tick /tmp/probe/held && \
             mkfifo /tmp/probe/never /tmp/probe/tick && echo \"#!$(which busybox) sh\" >/tmp/probe/blkid && \
             cat >>/tmp/probe/blkid <<'EOF'\n{script}EOF\n\
             chmod +x /tmp/probe/blkid && (/tmp/probe/blkid </dev/null >/dev/null 2>&1 &)"
        ))
        .await?;
        Ok(())
    }

    /// Makes the next unmount of `mnt` slow, as a filesystem with much unwritten data is: `bytes` of dirty page
    /// cache that the kernel writes back only when the filesystem shuts down. The mount leaves the mount table
    /// first and the unmount returns after the write-back, so a [`Self::probe_after_unmount`] probe holds the disk
    /// before the agent's final scan can run, however slowly the emulated guest schedules the probe.
    pub async fn slow_unmount(&self, mnt: &str, bytes: u64) -> Result<()> {
        self.run_ok(&format!(
            "echo 0 > /proc/sys/vm/dirty_writeback_centisecs && echo 360000 > /proc/sys/vm/dirty_expire_centisecs && \
             echo $((1 << 30)) > /proc/sys/vm/dirty_background_bytes && echo $((2 << 30)) > /proc/sys/vm/dirty_bytes && \
             head -c {bytes} /dev/zero > {mnt}/ballast"
        ))
        .await?;
        Ok(())
    }

    /// Waits until the [`Self::probe_after_unmount`] probe holds its disk.
    pub async fn wait_for_probe_hold(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while self.run("test -e /tmp/probe/held").await?.status != 0 {
            ensure!(Instant::now() < deadline, "the probe did not open the disk within {timeout:?} of the unmount");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// Restarts the agent inside the guest (SIGTERM: it says goodbye) and waits until it answers again.
    pub async fn restart_agent(&self) -> Result<()> {
        self.stop_agent("TERM").await?;
        self.start_agent().await
    }

    /// The usage report of disk `serial` as the agent gives it with its in-kernel (BPF) process source, which the
    /// guest's agent must be using, checked against the report of the same agent restarted with `--usage-scanner
    /// procfs` (then restarted as it was): the two must be the same but for when they were taken. For a moment with
    /// no release under way (a restart forgets what is released and not journalled).
    pub async fn usage_from_both_scanners(&self, serial: &str) -> Result<wukong_proto::v1::UsageReport> {
        let scanner = |info: wukong_proto::v1::AgentInfo| (info.usage_scanner, info.usage_scanner_reason);
        let (name, why) = scanner(self.agent().agent_info().await?);
        ensure!(name == "bpf", "the guest's agent scans with {name}, not BPF: {why}");
        let bpf = self.agent().check_usage(serial).await?;
        self.restart_agent_adding("--usage-scanner procfs").await?;
        let (name, why) = scanner(self.agent().agent_info().await?);
        ensure!(name == "procfs", "asked for /proc, the guest's agent scans with {name}: {why}");
        let procfs = self.agent().check_usage(serial).await;
        self.restart_agent().await?;
        let procfs = procfs?;
        let timeless = |r: &wukong_proto::v1::UsageReport| wukong_proto::v1::UsageReport {
            scanned_at: None,
            scan_duration: None,
            ..r.clone()
        };
        ensure!(
            timeless(&bpf) == timeless(&procfs),
            "the BPF and the /proc scans of disk {serial} differ:\nBPF: {bpf:#?}\n/proc: {procfs:#?}"
        );
        Ok(bpf)
    }

    /// Kills the guest's agent with SIGKILL (no goodbye: what a crash or the OOM killer does) and waits until it is
    /// gone. It stays down until [`Self::start_agent`].
    pub async fn kill_agent(&self) -> Result<()> {
        self.stop_agent("KILL").await
    }

    /// Starts the agent with /etc/wukong-agent.args (what the guest's init started it with, or
    /// [`Self::install_agent`]'s) and waits until it answers. An agent still running is an error: the new one could
    /// not listen, and the old one would answer.
    pub async fn start_agent(&self) -> Result<()> {
        self.start_agent_with("").await
    }

    /// Restarts the agent (SIGTERM) with `extra` flags after its usual ones, this once: a later
    /// [`Self::restart_agent`] starts it as before.
    pub async fn restart_agent_adding(&self, extra: &str) -> Result<()> {
        self.stop_agent("TERM").await?;
        self.start_agent_with(extra).await
    }

    /// [`Self::start_agent`] with `extra` flags after those of /etc/wukong-agent.args.
    async fn start_agent_with(&self, extra: &str) -> Result<()> {
        self.run_ok(&format!(
            "if pidof wukong-agent; then echo 'wukong-agent already runs'; exit 1; fi
             setsid wukong-agent $(cat /etc/wukong-agent.args) {extra} </dev/null >>/var/log/wukong-agent.log 2>&1 &"
        ))
        .await?;
        self.wait_for_agent(AGENT_START_TIMEOUT).await
    }

    /// Sends the agent `signal` and waits until no agent runs (none running already is no error: a restart after
    /// a kill).
    async fn stop_agent(&self, signal: &str) -> Result<()> {
        let script = format!(
            "for pid in $(pidof wukong-agent); do kill -{signal} $pid; done
             while pidof wukong-agent >/dev/null; do usleep 50000; done"
        );
        self.run_ok(&script).await.map(drop)
    }

    /// Resets the machine (QMP `system_reset`: no shutdown inside the guest, what a crash, a watchdog or a hard
    /// reset looks like; KubeVirt's VMI stays Running through it, as through a reboot the guest makes itself) and
    /// waits until it booted again and its agent answers; how long that took, from the reset. For a profile-A
    /// guest ([`Self::boot_with_options`]).
    ///
    /// What survives is what a real machine keeps: the devices, hot-plugged disks included (they stay in QEMU's
    /// device tree), their contents as far as the guest synced them, and QEMU's side of the network (its forwards,
    /// [`Self::forward_agent`]'s too). The guest's root filesystem is its initramfs, in memory: it boots as it
    /// did first, so whatever was changed in it is gone ([`Self::install_agent`]'s files; the agent's state and
    /// journal), the agent runs as the kernel command line says again, and the lab's own connections go back to
    /// plaintext. Mounts made before are gone too: mount again.
    pub async fn reboot(&self) -> Result<Duration> {
        let boots = self.console().matches(READY_MARKER).count();
        let started = Instant::now();
        // QEMU runs with -no-reboot, so that a guest that panics (panic=-1 reboots) ends the test instead of
        // looping; that would make this reset an exit too. Resets are allowed until the guest booted again, not
        // only for this one: the firmware resets the machine once more itself as it starts (SeaBIOS's "hard
        // reboot", a reset by the guest), and QEMU takes the action when a reset is requested.
        let reboot_action = |action: &str| serde_json::json!({"reboot": action});
        self.qmp.execute("set-action", Some(reboot_action("reset"))).await.context("allowing QEMU to reset")?;
        *self.agent_tls.lock().unwrap() = None;
        let booted = async {
            self.qmp.execute("system_reset", None).await.context("resetting the guest (system_reset)")?;
            self.wait_for_console(READY_MARKER, boots + 1, BOOT_TIMEOUT).await
        };
        let booted = booted.await;
        self.qmp.execute("set-action", Some(reboot_action("shutdown"))).await.context("restoring -no-reboot")?;
        booted?;
        self.wait_for_agent(AGENT_START_TIMEOUT).await?;
        let took = started.elapsed();
        tracing::info!(secs = took.as_secs_f64(), "guest rebooted");
        Ok(took)
    }

    /// The QMP socket left free for the companion under test.
    pub fn companion_qmp(&self) -> PathBuf {
        self.dir.path().join("companion.qmp")
    }

    /// A new empty image file of `size` bytes, for the companion to attach.
    pub fn new_image(&self, size: u64) -> Result<PathBuf> {
        let n = self.next_disk.fetch_add(1, Ordering::SeqCst);
        let image = self.dir.path().join(format!("volume{n}.raw"));
        std::fs::File::create(&image)?.set_len(size)?;
        Ok(image)
    }

    /// Creates an image and hot-plugs it.
    pub async fn hotplug(&self, spec: &DiskSpec) -> Result<PluggedDisk> {
        let n = self.next_disk.fetch_add(1, Ordering::SeqCst);
        let image = self.dir.path().join(format!("disk{n}.raw"));
        std::fs::File::create(&image)?.set_len(spec.size_bytes)?;
        self.plug(spec, n, image).await
    }

    /// Hot-plugs an unplugged disk's image again, with the same serial: what a re-attach does.
    pub async fn replug(&self, disk: &PluggedDisk) -> Result<PluggedDisk> {
        let n = self.next_disk.fetch_add(1, Ordering::SeqCst);
        self.plug(&disk.spec, n, disk.image.clone()).await
    }

    async fn plug(&self, spec: &DiskSpec, n: u32, image: PathBuf) -> Result<PluggedDisk> {
        let (kind, root_port) = match spec.bus {
            Bus::Scsi => (DiskDevice::Scsi { bus: "scsi0.0".into(), device_id: spec.device_id.clone() }, None),
            Bus::VirtioBlk => {
                let port = self.free_ports.lock().unwrap().pop().context("no free PCIe root port for virtio-blk")?;
                (DiskDevice::VirtioBlk { bus: format!("rp{port}") }, Some(port))
            }
        };
        let plug = DiskPlug {
            device: format!("disk{n}"),
            node: format!("node{n}"),
            image: image.clone(),
            format: "raw".into(),
            serial: spec.serial.clone(),
            kind,
        };
        self.qmp.plug_disk(&plug).await.with_context(|| format!("hot-plugging {}", spec.serial))?;
        Ok(PluggedDisk { spec: spec.clone(), device: plug.device, node: plug.node, image, root_port })
    }

    /// Hot-unplugs a disk and waits until QEMU has removed it.
    pub async fn unplug(&self, disk: &PluggedDisk) -> Result<()> {
        self.qmp.unplug_disk(&disk.device, &disk.node, Duration::from_secs(30)).await?;
        if let Some(port) = disk.root_port {
            self.free_ports.lock().unwrap().push(port);
        }
        Ok(())
    }

    /// Kills QEMU now.
    pub async fn shutdown(mut self) {
        let _ = self.qemu.kill().await;
    }
}

/// The guest's control channel (scripts/lab/guest-ctl-handler.sh, a test-only shell), by value: cheap to clone and
/// `Send + Sync`, so that the lab's own components (the lab's virt-handler asking the guest before an unplug, say) can
/// run commands in the guest without holding the [`Guest`], which a test owns. [`Guest::shell`] gives one.
#[derive(Debug, Clone)]
pub struct GuestShell {
    route: ControlRoute,
}

/// How the host reaches the control channel.
#[derive(Debug, Clone)]
enum ControlRoute {
    /// The loopback port QEMU forwards to the guest's port [`GUEST_CONTROL_PORT`].
    Tcp(u16),
    /// The guest's hybrid-vsock socket, for a guest without a network.
    Vsock(PathBuf),
}

impl GuestShell {
    /// Runs a shell script in the guest (busybox sh) and returns its output and exit status: over the network when
    /// the guest has one, else over vsock. Each call is one connection, so calls may run at once.
    pub async fn run(&self, script: &str) -> Result<GuestOutput> {
        const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
        let text = match &self.route {
            ControlRoute::Tcp(port) => {
                let connect = tokio::net::TcpStream::connect(("127.0.0.1", *port));
                let stream = tokio::time::timeout(CONNECT_TIMEOUT, connect)
                    .await
                    .context("connecting to the guest control channel timed out")??;
                converse(stream, script).await?
            }
            ControlRoute::Vsock(socket) => {
                converse(vsock_connect_within(socket, GUEST_CONTROL_PORT.into(), CONNECT_TIMEOUT).await?, script)
                    .await?
            }
        };
        let (output, status) = match text.rfind(STATUS_MARKER) {
            Some(i) => (text[..i].to_string(), text[i + STATUS_MARKER.len()..].trim().parse().unwrap_or(-1)),
            None => bail!("the guest control channel closed without a status; output: {text}"),
        };
        Ok(GuestOutput { output, status })
    }

    /// Runs a script that must succeed; returns its output.
    pub async fn run_ok(&self, script: &str) -> Result<String> {
        let out = self.run(script).await?;
        if out.status != 0 {
            bail!("guest command failed with status {}: {script}\n{}", out.status, out.output);
        }
        Ok(out.output)
    }
}

/// A connection to vsock port `port` of the guest behind the hybrid-vsock socket `socket`, retried until `timeout`
/// (a CONNECT is not answered before the guest's driver is up and something listens on the port).
async fn vsock_connect_within(socket: &Path, port: u32, timeout: Duration) -> Result<tokio::net::UnixStream> {
    let deadline = Instant::now() + timeout;
    loop {
        match hybrid_vsock_connect(socket, port).await {
            Ok(stream) => return Ok(stream),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!("the guest's vsock port {port} did not answer within {timeout:?}")));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// What the guest's control handler ends its answer with, followed by the script's exit status and a newline.
const STATUS_MARKER: &str = "__WUKONG_RC=";

/// One exchange with the guest's control handler (scripts/lab/guest-ctl-handler.sh): the script's length on a line,
/// the script, then the answer up to its status line. Neither side half-closes (over vsock that would be a full
/// shutdown), so the answer ends at its status line, not at the end of the stream.
async fn converse<S>(mut stream: S, script: &str) -> Result<String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    stream.write_all(format!("{}\n{script}", script.len()).as_bytes()).await?;
    let mut raw = Vec::new();
    let answer = async {
        let mut buf = [0u8; 8192];
        while !ends_with_status(&raw) {
            match stream.read(&mut buf).await? {
                0 => break,
                n => raw.extend_from_slice(&buf[..n]),
            }
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(GUEST_COMMAND_TIMEOUT, answer)
        .await
        .with_context(|| format!("the guest command did not finish within {GUEST_COMMAND_TIMEOUT:?}: {script}"))??;
    Ok(String::from_utf8_lossy(&raw).into_owned())
}

/// Whether `raw` ends with the handler's status line (looked for in its tail only: answers can be long).
fn ends_with_status(raw: &[u8]) -> bool {
    let text = String::from_utf8_lossy(&raw[raw.len().saturating_sub(64)..]);
    text.rfind(STATUS_MARKER).is_some_and(|i| {
        let rest = &text[i + STATUS_MARKER.len()..];
        rest.strip_suffix('\n').is_some_and(|code| code.parse::<i32>().is_ok())
    })
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
}
