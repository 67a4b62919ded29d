//! The guest lab: a real Linux guest under QEMU (TCG), with the freshly built agent, disks hot-plugged over QMP,
//! and a test-only control channel to run commands inside it.
//!
//! Nothing here is skipped when something is missing: a lab that cannot start fails the test with the reason.

pub mod cdi_lab;
pub mod cluster;
pub mod helm;
pub mod kubevirt_crds;
pub mod kubevirt_lab;
pub mod kubevirt_webhooks;
pub mod lab_events;
pub mod lab_pod;
pub mod node;
pub mod operator_lab;
pub mod pki;
pub mod ports;
pub mod readme_install;
pub mod storage_lab;

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use wukong_controller_client::agent_client::{AgentAddress, AgentClient, TlsFiles};
use wukong_controller_client::qmp::{DiskDevice, DiskPlug, QmpClient};

/// Port the agent listens on inside the guest.
const GUEST_AGENT_PORT: u16 = 7443;
/// Port of the control channel inside the guest.
const GUEST_CONTROL_PORT: u16 = 2323;
/// Time allowed for the guest to boot under TCG (it takes 5–15 s; CI machines can be slower).
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// systemd, udev and cloud-init's first stages under TCG.
const SYSTEMD_BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest a command run in the guest may take.
const GUEST_COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// PCIe root ports for virtio-blk hot-plug (q35's root bus itself cannot hot-plug).
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

/// The agent binary put into the guest: `$WUKONG_AGENT_BIN`, or the release build for guests (glibc 2.17, built by
/// `scripts/lib/build-guest-agent.sh`), the binary users download.
pub fn agent_binary() -> PathBuf {
    std::env::var_os("WUKONG_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("x86_64-unknown-linux-gnu/release/wukong-agent"))
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
    static ASSETS: OnceLock<Assets> = OnceLock::new();
    if let Some(a) = ASSETS.get() {
        return Ok(a);
    }
    let dir = target_dir().join("wukong-lab");
    let agent = agent_binary();
    if !agent.exists() {
        bail!("the agent binary {} does not exist; run `scripts/lib/build-guest-agent.sh` first", agent.display());
    }
    build_if_stale(&dir.join("initrd.img"), Some(&agent), "build-guest.sh", &[&dir, &agent])?;
    Ok(ASSETS.get_or_init(|| Assets { kernel: dir.join("vmlinuz"), initrd: dir.join("initrd.img") }))
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
        let dir = tempfile::tempdir()?;
        let child = std::process::Command::new(agent_binary())
            .args(["--listen", listen, "--socket"])
            .arg(dir.path().join("agent.sock"))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
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

/// A running guest. Killed when dropped.
pub struct Guest {
    qemu: Child,
    dir: tempfile::TempDir,
    pub qmp: QmpClient,
    agent_port: u16,
    control_port: u16,
    next_disk: AtomicU32,
    free_ports: std::sync::Mutex<Vec<u32>>,
    /// The lab's client certificate once the agent serves mutual TLS ([`Guest::serve_agent_tls`]).
    agent_tls: std::sync::Mutex<Option<TlsFiles>>,
}

impl Guest {
    /// Boots a guest (profile A) and waits until its agent is ready.
    pub async fn boot() -> Result<Self> {
        Self::boot_with(&[]).await
    }

    /// Boots a guest (profile A) with extra QEMU arguments, and waits until its agent is ready.
    pub async fn boot_with(qemu_args: &[&str]) -> Result<Self> {
        let assets = assets()?;
        let started = Instant::now();
        let extra: Vec<String> = qemu_args.iter().map(|a| a.to_string()).collect();
        let append = "console=ttyS0 panic=-1 loglevel=4";
        let guest = Self::launch(&assets.kernel, &assets.initrd, append, 512, &extra).await?;
        guest.wait_for_console("WUKONG-LAB-READY", BOOT_TIMEOUT).await?;
        guest.wait_for_agent(Duration::from_secs(30)).await?;
        tracing::info!(secs = started.elapsed().as_secs_f64(), "guest ready");
        Ok(guest)
    }

    /// Boots the systemd guest (profile B) with a NoCloud seed, and waits until systemd has started the lab's
    /// control channel. The agent is whatever cloud-init installs from the seed: wait for it separately.
    pub async fn boot_systemd(seed: &Path) -> Result<Self> {
        let assets = systemd_assets()?;
        let drives = [
            // snapshot: the image stays pristine for the next test.
            format!("file={},format=raw,if=none,id=root,snapshot=on", assets.root.display()),
            format!("file={},format=raw,if=none,id=seed,readonly=on", seed.display()),
        ];
        let mut extra = Vec::new();
        for (drive, id) in drives.iter().zip(["root", "seed"]) {
            extra.extend(["-drive".to_string(), drive.clone(), "-device".into(), format!("virtio-blk-pci,drive={id}")]);
        }
        let append = "console=ttyS0 panic=-1 loglevel=4 systemd.show_status=0";
        let guest = Self::launch(&assets.kernel, &assets.loader, append, 1024, &extra).await?;
        guest.wait_for_console("WUKONG-LAB-READY", SYSTEMD_BOOT_TIMEOUT).await?;
        Ok(guest)
    }

    async fn launch(kernel: &Path, initrd: &Path, append: &str, memory_mb: u32, extra: &[String]) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("wukong-guest-").tempdir()?;
        let (agent_port, control_port) = (ports::free_port()?, ports::free_port()?);
        let console = dir.path().join("console.log");
        let qmp_path = dir.path().join("qmp.sock");
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-M", "q35", "-accel", "tcg", "-cpu", "max", "-m", &memory_mb.to_string(), "-smp", "1"])
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
            .args(extra);
        for port in 1..=ROOT_PORTS {
            cmd.arg("-device").arg(format!("pcie-root-port,id=rp{port},bus=pcie.0,chassis={port}"));
        }
        cmd.arg("-netdev")
            .arg(format!(
                "user,id=n0,hostfwd=tcp:127.0.0.1:{agent_port}-:{GUEST_AGENT_PORT},\
                 hostfwd=tcp:127.0.0.1:{control_port}-:{GUEST_CONTROL_PORT}"
            ))
            .args(["-device", "virtio-net-pci,netdev=n0,romfile="])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("qemu.log"))?)
            .kill_on_drop(true);
        let qemu = cmd.spawn().context("cannot start qemu-system-x86_64; run scripts/lib/install-deps.sh")?;

        let started = Instant::now();
        let qmp = loop {
            match QmpClient::connect(&qmp_path).await {
                Ok(q) => break q,
                Err(_) if started.elapsed() < Duration::from_secs(10) => {
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
            agent_port,
            control_port,
            next_disk: AtomicU32::new(0),
            free_ports: std::sync::Mutex::new((1..=ROOT_PORTS).rev().collect()),
            agent_tls: std::sync::Mutex::new(None),
        })
    }

    /// Everything the guest printed on its serial console so far.
    pub fn console(&self) -> String {
        read_lossy(&self.dir.path().join("console.log"))
    }

    async fn wait_for_console(&self, marker: &str, timeout: Duration) -> Result<()> {
        let started = Instant::now();
        loop {
            if self.console().contains(marker) {
                return Ok(());
            }
            if started.elapsed() > timeout {
                bail!("the guest did not print {marker:?} within {timeout:?}; console:\n{}", self.console());
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

    /// The loopback port the guest agent's port is forwarded to.
    pub fn agent_port(&self) -> u16 {
        self.agent_port
    }

    pub fn agent_address(&self) -> AgentAddress {
        AgentAddress::Tcp(format!("http://127.0.0.1:{}", self.agent_port))
    }

    /// A client of the guest's agent.
    pub fn agent(&self) -> AgentClient {
        let tls = self.agent_tls.lock().unwrap().clone();
        AgentClient::connect_with(self.agent_address(), tls.as_ref()).expect("the lab's agent address is valid")
    }

    /// Installs files into the guest (host file → guest path) and restarts its agent with `args` (`--config
    /// /etc/wukong-agent/agent.toml`, say), as an install in a real guest does. With `client`, the lab's own
    /// connections (`agent()`) then use mutual TLS with those files.
    pub async fn install_agent(&self, files: &[(&Path, &str)], args: &str, client: Option<TlsFiles>) -> Result<()> {
        let mut script = String::new();
        for (from, to) in files {
            let text = std::fs::read_to_string(from).with_context(|| from.display().to_string())?;
            let dir = Path::new(to).parent().and_then(Path::to_str).unwrap_or("/");
            script.push_str(&format!("mkdir -p {dir}\ncat > {to} <<'WUKONG-FILE'\n{text}\nWUKONG-FILE\n"));
        }
        script.push_str(&format!(
            "kill $(pidof wukong-agent); while pidof wukong-agent >/dev/null; do usleep 50000; done\n\
             setsid wukong-agent {args} </dev/null >>/var/log/wukong-agent.log 2>&1 &\n"
        ));
        self.run_ok(&script).await?;
        *self.agent_tls.lock().unwrap() = client;
        self.wait_for_agent(Duration::from_secs(30)).await
    }

    /// Forwards `address`:7443 on the host to the guest's agent too (QEMU's `hostfwd_add`), where Pods on the lab's
    /// node reach it: a VMI that reports `address` as its pod network's IP is then reached as in a cluster.
    pub async fn forward_agent(&self, address: std::net::Ipv4Addr) -> Result<()> {
        let rule = format!("hostfwd_add n0 tcp:{address}:{GUEST_AGENT_PORT}-:{GUEST_AGENT_PORT}");
        let reply = self.qmp.execute("human-monitor-command", Some(serde_json::json!({"command-line": rule}))).await?;
        let said = reply.as_str().unwrap_or_default();
        anyhow::ensure!(said.trim().is_empty(), "QEMU refused to forward {address}:{GUEST_AGENT_PORT}: {said}");
        Ok(())
    }

    /// Runs a shell script in the guest (busybox sh) and returns its output and exit status.
    pub async fn run(&self, script: &str) -> Result<GuestOutput> {
        let mut stream = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::net::TcpStream::connect(("127.0.0.1", self.control_port)),
        )
        .await
        .context("connecting to the guest control channel timed out")??;
        stream.write_all(script.as_bytes()).await?;
        stream.shutdown().await?;
        let mut raw = Vec::new();
        tokio::time::timeout(GUEST_COMMAND_TIMEOUT, stream.read_to_end(&mut raw)).await.with_context(|| {
            format!("the guest command did not finish within {GUEST_COMMAND_TIMEOUT:?}: {script}")
        })??;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (output, status) = match text.rfind("__WUKONG_RC=") {
            Some(i) => (text[..i].to_string(), text[i + 12..].trim().parse().unwrap_or(-1)),
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

    /// Makes an ext4 filesystem on `dev`, mounts it at `mnt` and writes `bytes` of random data to `mnt/data`
    /// without any sync; returns the data's SHA-256.
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

    /// Restarts the agent inside the guest and waits until it answers again.
    /// Starts a process named like udev's blkid probe that opens `dev` as soon as `mnt` is unmounted and holds it
    /// until killed (its pid is in /tmp/probe/pid): to the agent, a udev probe that never ends.
    pub async fn probe_after_unmount(&self, dev: &str, mnt: &str) -> Result<()> {
        self.run_ok(&format!(
            "mkdir -p /tmp/probe && rm -f /tmp/probe/never && mkfifo /tmp/probe/never && \
             printf '#!/bin/sh\\necho $$ >/tmp/probe/pid\\nwhile grep -q \" {mnt} \" /proc/mounts; do sleep 0.02; done\\nexec 3<{dev}\\nread x </tmp/probe/never\\n' > /tmp/probe/blkid && \
             chmod +x /tmp/probe/blkid && (/tmp/probe/blkid </dev/null >/dev/null 2>&1 &)"
        ))
        .await?;
        Ok(())
    }

    pub async fn restart_agent(&self) -> Result<()> {
        self.run_ok(
            "kill $(pidof wukong-agent); while pidof wukong-agent >/dev/null; do usleep 50000; done
             setsid wukong-agent --listen 0.0.0.0:7443 --insecure-plaintext </dev/null >>/var/log/wukong-agent.log 2>&1 &",
        )
        .await?;
        self.wait_for_agent(Duration::from_secs(30)).await
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

fn read_lossy(path: &Path) -> String {
    std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
}
