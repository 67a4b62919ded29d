//! A real Kubernetes node in the lab: the cluster's API server bound to an extra /32 on `lo` (so Pods reach it),
//! kube-controller-manager (ServiceAccount tokens, Deployments, endpoints), kube-scheduler, containerd with runc and
//! a CNI bridge, a kubelet and kube-proxy in iptables mode, all v1.20.2 from `scripts/lib/install-kube.sh` and
//! Debian's containerd, runc and CNI plugins. Images come from OCI archives imported into containerd (no registry);
//! the sandbox image is the lab's own `pause` (`scripts/lab/build-pod-images.sh`).
//!
//! The node is host-wide, whatever its flags say (see `HOST_PATHS`, `SYSCTLS`, the iptables chains, the bridge, the
//! `kubepods` cgroups): one node per machine at a time, under a lock file held from start to the end of teardown;
//! a second [`Node::start`] (another test thread, or another test binary) waits for it. Before the first kubelet
//! start an egress guard drops everything sent to the cloud metadata address and everything between the Pods'
//! bridge and any other interface. Dropping the node stops everything in order and removes what it made.
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! use wukong_e2e::{cluster, node};
//! let node = node::Node::start(&[]).await?; // etcd, API server, node Ready (about 21 s)
//! node.import_image(std::path::Path::new("image.oci.tar"))?; // then `imagePullPolicy: IfNotPresent` or `Never`
//! let admin = node.client(cluster::ADMIN).await?;
//! let document = serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "lab"}});
//! cluster::apply(&admin, &document).await?; // any kind: created, or merged into what exists
//! node::wait_for_pods(&admin, "lab", "app=x", 1, std::time::Duration::from_secs(120)).await?;
//! # Ok(()) }
//! ```
//!
//! Pods reach the host only at [`NODE_ADDRESS`] (never 127.0.0.1): a host server a Pod must call binds there.
//! The bridge plugin enforces no NetworkPolicy.

use crate::cluster::{Cluster, NodeApi};
use crate::process::Lab;
use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Node as NodeObject, Pod};
use kube::api::{Api, ListParams};
use nix::fcntl::{Flock, FlockArg};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The node's name (the kubelet's `--hostname-override`).
pub const NODE_NAME: &str = "wukong-lab-node";
/// The node's address: an extra /32 on `lo` (this kernel has no dummy links). The API server binds it, the kubelet
/// reports it as its InternalIP (a node IP cannot be in 127/8), and Pods reach it through their bridge.
pub const NODE_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 89, 255, 1);
/// The Pods' addresses, on the bridge [`BRIDGE`].
pub const POD_CIDR: &str = "10.89.0.0/24";
/// The CNI bridge.
pub const BRIDGE: &str = "wukong-lab0";
/// containerd's sandbox image.
pub const PAUSE_IMAGE: &str = "localhost/wukong-lab/pause:1";
/// The egress guard's chain on OUTPUT: what the host would send to [`METADATA_ADDRESS`].
pub const OUTPUT_GUARD: &str = "WUKONG-LAB-OUTPUT";
/// The egress guard's chain on FORWARD: whatever crosses between [`BRIDGE`] and any other interface.
pub const FORWARD_GUARD: &str = "WUKONG-LAB-FORWARD";
/// The cloud metadata address the kubelet's AWS credential provider probes at start (13 packets a start, measured).
pub const METADATA_ADDRESS: &str = "169.254.169.254";
/// One node per machine: the kubelet, kube-proxy and their ports (10250, 10249, 10256) are host-wide.
const LOCK_FILE: &str = "/run/wukong-lab-node.lock";
/// Where Debian's containernetworking-plugins put the plugins.
const CNI_BIN_DIR: &str = "/usr/lib/cni";
/// Node Ready takes about 25 s from cold on 2 cores (with the API server); a build running beside it doubles that.
const READY_TIMEOUT: Duration = Duration::from_secs(240);
/// The control plane's identities and their groups; the default RBAC binds these user names, the Node authorizer
/// the kubelet's.
const CONTROLLER_MANAGER: &str = "system:kube-controller-manager";
const SCHEDULER: &str = "system:kube-scheduler";
const PROXY: &str = "system:kube-proxy";
const KUBELET: &str = "system:node:wukong-lab-node";
/// Written by the kubelet, containerd and the CNI plugins whatever their flags say (device plugins, Pod logs, CNI
/// results, shim sockets, network namespaces), or by a default the lab overrides (flex volumes, containerd's opt,
/// the control plane's self-signed certificates), checked all the same: each one that did not exist before the
/// node started is removed after it.
const HOST_PATHS: &[&str] = &[
    "/var/lib/kubelet",
    "/var/log/pods",
    "/var/log/containers",
    "/var/lib/cni",
    "/run/containerd",
    "/run/netns",
    "/usr/libexec/kubernetes",
    "/opt/containerd",
    "/run/kubernetes",
    "/etc/cni",
];
/// Kernel settings the node changes, restored afterwards: the bridge plugin turns on forwarding, kube-proxy
/// `route_localnet`, the kubelet its kernel tunables (it sets them unless `--protect-kernel-defaults`, which would
/// refuse to start on a machine that has other values).
const SYSCTLS: &[&str] = &[
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/route_localnet",
    "net/bridge/bridge-nf-call-iptables",
    "net/bridge/bridge-nf-call-ip6tables",
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
];

/// The lab's two local images as OCI archives, built once (and again when the lab's scripts or `wukong-lab-pod`
/// change).
#[derive(Debug, Clone)]
pub struct LabImages {
    /// [`PAUSE_IMAGE`].
    pub pause: PathBuf,
    /// [`crate::lab_pod::IMAGE`].
    pub pod: PathBuf,
}

/// Builds the lab's images if they are missing or stale.
pub fn lab_images() -> Result<LabImages> {
    let dir = crate::target_dir().join("wukong-lab").join("pod-images");
    let binary = crate::profile_binary("wukong-lab-pod");
    if !binary.is_file() {
        bail!(
            "{} does not exist; `cargo test -p wukong-e2e` builds it (or cargo build -p wukong-e2e --bins)",
            binary.display()
        );
    }
    crate::build_if_stale(&dir.join("pod.tar"), Some(&binary), "build-pod-images.sh", &[&dir, &binary])?;
    Ok(LabImages { pause: dir.join("pause.tar"), pod: dir.join("pod.tar") })
}

/// What the node takes to come up, from the moment it holds the machine's lock.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    pub api_server_ready: Duration,
    pub node_ready: Duration,
}

/// The machine's state the node may change, taken before it starts and after it stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSnapshot {
    /// Which of `HOST_PATHS` exist.
    pub paths: BTreeMap<String, bool>,
    /// The `SYSCTLS` this kernel has, with their values.
    pub sysctls: BTreeMap<String, String>,
    /// The named network namespaces.
    pub netns: BTreeSet<String>,
}

impl HostSnapshot {
    pub fn capture() -> Self {
        let paths = HOST_PATHS.iter().map(|p| (p.to_string(), Path::new(p).exists())).collect();
        let sysctls = SYSCTLS
            .iter()
            .filter_map(|s| {
                let value = std::fs::read_to_string(Path::new("/proc/sys").join(s)).ok()?;
                Some((s.to_string(), value.trim().to_string()))
            })
            .collect();
        let netns = std::fs::read_dir("/run/netns")
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        Self { paths, sysctls, netns }
    }
}

/// What stopping the node left, checked while it still held the machine's lock.
#[derive(Debug)]
pub struct Teardown {
    pub before: HostSnapshot,
    pub after: HostSnapshot,
    /// Lab state still present (see [`leftovers`]); empty when the teardown was complete.
    pub leftovers: Vec<String>,
    /// Steps of the teardown that failed.
    pub errors: Vec<String>,
    /// The node's processes (its cluster's and containerd's shims too) still running.
    pub alive: Vec<u32>,
}

/// The lab's own host-wide state present now: the node address on `lo`, the bridge, `KUBE-*` and `WUKONG-LAB-*`
/// iptables chains, `kubepods` cgroups.
pub fn leftovers() -> Vec<String> {
    let mut found = Vec::new();
    if lo_has_node_address() {
        found.push(format!("address {NODE_ADDRESS}/32 on lo"));
    }
    if Path::new("/sys/class/net").join(BRIDGE).exists() {
        found.push(format!("link {BRIDGE}"));
    }
    for tool in ["iptables", "ip6tables"] {
        for table in ["filter", "nat", "mangle"] {
            for chain in lab_chains(tool, table).unwrap_or_default() {
                found.push(format!("{tool} -t {table} chain {chain}"));
            }
        }
    }
    found.extend(kubepods_cgroups().iter().map(|p| format!("cgroup {}", p.display())));
    found
}

/// A process of the node, its output in `<dir>/<name>.log`.
struct Process {
    name: &'static str,
    child: Child,
}

/// A running node with its cluster. Stopped, and its host-wide state removed, when dropped (or by [`Node::stop`]).
pub struct Node {
    cluster: Option<Cluster>,
    /// In start order; stopped in reverse, containerd's containers before containerd.
    processes: Vec<Process>,
    dir: tempfile::TempDir,
    before: HostSnapshot,
    pub timings: Timings,
    stopped: bool,
    _lock: Flock<std::fs::File>,
}

impl Node {
    /// Starts a cluster with an admin and `users` (as [`Cluster::start`]) and a node, and waits until the node is
    /// Ready. Waits first for any other node on this machine to stop.
    pub async fn start(users: &[&str]) -> Result<Self> {
        preflight()?;
        let images = lab_images()?;
        let lock = tokio::task::spawn_blocking(lock_machine).await??;
        let started = Instant::now();
        // A lab that crashed (or was killed) left its state: the lock says no node runs now.
        let _ = remove_lab_state();
        let before = HostSnapshot::capture();
        let dir = crate::process::lab_tempdir("wukong-node-")?;
        // From here on a failure drops the node, which undoes whatever was done.
        let mut node = Self {
            cluster: None,
            processes: Vec::new(),
            dir,
            before,
            timings: Timings { api_server_ready: Duration::ZERO, node_ready: Duration::ZERO },
            stopped: false,
            _lock: lock,
        };
        node.guard_egress()?;
        run("ip", &["addr", "add", &format!("{NODE_ADDRESS}/32"), "dev", "lo"])?;
        let identities = [(CONTROLLER_MANAGER, ""), (SCHEDULER, ""), (PROXY, ""), (KUBELET, "system:nodes")];
        let cluster =
            Cluster::start_with(users, Some(NodeApi { address: NODE_ADDRESS, identities: &identities })).await?;
        node.cluster = Some(cluster);
        node.timings.api_server_ready = started.elapsed();
        node.start_control_plane()?;
        node.start_containerd().await?;
        node.import_image(&images.pause)?;
        node.start_kubelet_and_proxy()?;
        node.wait_ready().await?;
        node.timings.node_ready = started.elapsed();
        tracing::info!(timings = ?node.timings, "node ready");
        Ok(node)
    }

    /// The node's cluster.
    pub fn cluster(&self) -> &Cluster {
        self.cluster.as_ref().expect("a node has its cluster until it stops")
    }

    /// A client acting as `user` (see [`Cluster::client`]).
    pub async fn client(&self, user: &str) -> Result<kube::Client> {
        self.cluster().client(user).await
    }

    /// Imports an OCI archive into containerd's `k8s.io` namespace, under the name its index gives it, where the
    /// kubelet finds it: Pods use it with `imagePullPolicy: Never`.
    pub fn import_image(&self, archive: &Path) -> Result<()> {
        self.import(archive, None)
    }

    /// As [`Self::import_image`] for an archive whose index names only a tag (`wukong-operator:0.1.0` is stored
    /// as `0.1.0`): containerd keeps the full reference only under `base_name` (`ctr import --base-name`), as the
    /// README's air-gapped install does.
    pub fn import_image_as(&self, archive: &Path, base_name: &str) -> Result<()> {
        self.import(archive, Some(base_name))
    }

    /// SIGKILLs container `id`'s task (a crash, not a stop: no SIGTERM, no preStop); the kubelet then restarts it
    /// or, with its Pod deleted, does not.
    pub fn kill_container(&self, id: &str) -> Result<()> {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(self.containerd_socket())
            .args(["-n", "k8s.io", "tasks", "kill", "--signal", "SIGKILL", id])
            .output()
            .context("cannot run ctr; run scripts/lib/install-kube.sh")?;
        if !out.status.success() {
            bail!("SIGKILL of container {id} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    fn import(&self, archive: &Path, base_name: Option<&str>) -> Result<()> {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(self.containerd_socket())
            .args(["-n", "k8s.io", "images", "import"])
            .args(base_name.map(|b| format!("--base-name={b}")))
            .arg(archive)
            .output()
            .context("cannot run ctr; run scripts/lib/install-kube.sh")?;
        if !out.status.success() {
            bail!("importing {} into containerd failed: {}", archive.display(), String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// The last lines of a node process's log (`kubelet`, `containerd`, `kube-proxy`, `kube-controller-manager`,
    /// `kube-scheduler`), for error messages.
    pub fn log(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default();
        // A Go process that dies fatally dumps its goroutines after the message that matters.
        let lines: Vec<&str> = text.lines().take_while(|l| !l.starts_with("goroutine ")).collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Resident memory of each process of the node and its cluster, in KiB.
    pub fn rss(&self) -> Vec<(String, u64)> {
        let (cluster_pids, _) = self.cluster().footprint();
        let named = ["etcd", "kube-apiserver"].into_iter().zip(cluster_pids);
        named
            .chain(self.processes.iter().map(|p| (p.name, p.child.id())))
            .filter_map(|(name, pid)| {
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
                let kib = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
                Some((name.to_string(), kib))
            })
            .collect()
    }

    /// Packets dropped so far by the egress guard's rules in `chain` ([`OUTPUT_GUARD`] or [`FORWARD_GUARD`]), summed.
    pub fn dropped(&self, chain: &str) -> Result<u64> {
        let listing = output("iptables", &["-t", "filter", "-L", chain, "-v", "-x", "-n"])?;
        // Two header lines, then "pkts bytes target ..." per rule.
        Ok(listing.lines().skip(2).filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok()).sum())
    }

    /// Stops the node and its cluster, removes its host-wide state and reports what is left, before another node
    /// may start.
    pub fn stop(mut self) -> Teardown {
        let mut pids: Vec<u32> = self.processes.iter().map(|p| p.child.id()).collect();
        pids.extend(self.cluster().footprint().0);
        pids.extend(processes_mentioning(&self.containerd_socket()));
        let errors = self.teardown();
        let alive = pids.into_iter().filter(|pid| crate::process::is_running(*pid as i32)).collect();
        Teardown { before: self.before.clone(), after: HostSnapshot::capture(), leftovers: leftovers(), errors, alive }
    }

    fn containerd_socket(&self) -> PathBuf {
        self.dir.path().join("containerd/containerd.sock")
    }

    fn spawn(&mut self, name: &'static str, command: &mut Command) -> Result<()> {
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.log")))?;
        let child = command
            .join()?
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {name}; run scripts/lib/install-kube.sh"))?;
        self.processes.push(Process { name, child });
        Ok(())
    }

    /// Fails with its log if a node process has exited.
    fn check_alive(&mut self) -> Result<()> {
        for i in 0..self.processes.len() {
            if let Some(status) = self.processes[i].child.try_wait()? {
                let name = self.processes[i].name;
                bail!("{name} exited ({status}): {}", self.log(name));
            }
        }
        Ok(())
    }

    /// Before the first kubelet start: nothing from the lab reaches the cloud metadata address or leaves through
    /// the Pods' bridge. Counters on these rules are what a test reads.
    fn guard_egress(&self) -> Result<()> {
        let bridge_out = ["-i", BRIDGE, "!", "-o", BRIDGE, "-j", "DROP"];
        let bridge_in = ["-o", BRIDGE, "!", "-i", BRIDGE, "-j", "DROP"];
        run("iptables", &["-N", OUTPUT_GUARD])?;
        run("iptables", &["-A", OUTPUT_GUARD, "-d", METADATA_ADDRESS, "-j", "DROP"])?;
        run("iptables", &["-I", "OUTPUT", "1", "-j", OUTPUT_GUARD])?;
        run("iptables", &["-N", FORWARD_GUARD])?;
        run("iptables", &[&["-A", FORWARD_GUARD][..], &bridge_out].concat())?;
        run("iptables", &[&["-A", FORWARD_GUARD][..], &bridge_in].concat())?;
        run("iptables", &["-I", "FORWARD", "1", "-j", FORWARD_GUARD])
    }

    fn start_control_plane(&mut self) -> Result<()> {
        let bin = crate::cluster::kube_bin_dir();
        let cluster = self.cluster();
        let (cm_config, scheduler_config) = (cluster.kubeconfig(CONTROLLER_MANAGER)?, cluster.kubeconfig(SCHEDULER)?);
        let (sa_key, ca) = (cluster.file("sa.key"), cluster.file("ca.crt"));
        let certs = self.dir.path().join("certs");
        // Each controller acts as its own ServiceAccount (as kubeadm runs it), with the default RBAC's roles.
        // --port=0 --secure-port=0: nothing scrapes them, and serving would write certificates to /run/kubernetes.
        self.spawn(
            "kube-controller-manager",
            Command::new(bin.join("kube-controller-manager"))
                .arg(format!("--kubeconfig={}", cm_config.display()))
                .arg("--use-service-account-credentials=true")
                .arg(format!("--service-account-private-key-file={}", sa_key.display()))
                .arg(format!("--root-ca-file={}", ca.display()))
                .args(["--leader-elect=false", "--port=0", "--secure-port=0"])
                // The lab's storage (crate::storage_lab) binds claims as the current PV controller does: this 1.20
                // binder would race it, and writes only the beta provisioner annotation. The lab's KubeVirt runs its
                // attachment Pods on its own node, which has no Node object (the Pod garbage collector would delete
                // them as orphans). The garbage collector and the pvc- and pv-protection controllers run.
                .arg("--controllers=*,-persistentvolume-binder,-attachdetach,-podgc")
                .arg(format!("--cert-dir={}", certs.display())),
        )?;
        self.spawn(
            "kube-scheduler",
            Command::new(bin.join("kube-scheduler"))
                .arg(format!("--kubeconfig={}", scheduler_config.display()))
                .args(["--leader-elect=false", "--port=0", "--secure-port=0"])
                .arg(format!("--cert-dir={}", certs.display())),
        )
    }

    async fn start_containerd(&mut self) -> Result<()> {
        let dir = self.dir.path().join("containerd");
        let cni = self.dir.path().join("cni");
        std::fs::create_dir_all(&dir)?;
        std::fs::create_dir_all(cni.join("net.d"))?;
        // No masquerading: nothing leaves the bridge (the egress guard), and the API server sees Pods' addresses.
        let conflist = serde_json::json!({
            "cniVersion": "0.4.0", "name": "wukong-lab",
            "plugins": [{
                "type": "bridge", "bridge": BRIDGE, "isGateway": true, "ipMasq": false, "hairpinMode": true,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR}]], "routes": [{"dst": "0.0.0.0/0"}],
                         "dataDir": cni.join("ipam")},
            }],
        });
        std::fs::write(cni.join("net.d/10-wukong-lab.conflist"), serde_json::to_string_pretty(&conflist)?)?;
        let d = dir.display();
        // restrict_oom_score_adj: root here lacks CAP_SYS_RESOURCE, and runc fails every sandbox when it lowers
        // oom_score_adj to the kubelet's -998 ("can't get final child's PID from pipe: EOF"). cgroupfs: PID 1 is
        // not systemd.
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
[grpc]
  address = "{d}/containerd.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{d}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{}"
"#,
            cni.join("net.d").display()
        );
        std::fs::write(dir.join("config.toml"), config)?;
        self.spawn("containerd", Command::new("containerd").arg("--config").arg(dir.join("config.toml")))?;
        let started = Instant::now();
        loop {
            self.check_alive()?;
            let version = Command::new("ctr").arg("--address").arg(self.containerd_socket()).arg("version").output();
            if version.is_ok_and(|o| o.status.success()) {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!("containerd did not answer within 60 s: {}", self.log("containerd"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn start_kubelet_and_proxy(&mut self) -> Result<()> {
        let bin = crate::cluster::kube_bin_dir();
        let root = self.dir.path().join("kubelet");
        let (kubelet_config, proxy_config) = (self.cluster().kubeconfig(KUBELET)?, self.cluster().kubeconfig(PROXY)?);
        let (flex, seccomp) = (self.dir.path().join("flexvolume"), self.dir.path().join("seccomp"));
        for d in [&root, &flex, &seccomp] {
            std::fs::create_dir_all(d)?;
        }
        let socket = self.containerd_socket();
        self.spawn(
            "kubelet",
            Command::new(bin.join("kubelet"))
                // The in-tree AWS credential provider probes the metadata address at start otherwise.
                .env("AWS_EC2_METADATA_DISABLED", "true")
                .arg(format!("--kubeconfig={}", kubelet_config.display()))
                .arg(format!("--hostname-override={NODE_NAME}"))
                .arg(format!("--node-ip={NODE_ADDRESS}"))
                .arg(format!("--address={NODE_ADDRESS}"))
                .arg(format!("--root-dir={}", root.display()))
                .arg(format!("--cert-dir={}", root.join("pki").display()))
                .args(["--container-runtime=remote", "--cgroup-driver=cgroupfs", "--fail-swap-on=false"])
                .arg(format!("--container-runtime-endpoint=unix://{}", socket.display()))
                .arg(format!("--volume-plugin-dir={}", flex.display()))
                .arg(format!("--seccomp-profile-root={}", seccomp.display()))
                .arg(format!("--pod-infra-container-image={PAUSE_IMAGE}"))
                // The default -999 for itself needs CAP_SYS_RESOURCE, which root lacks here (see restrict_oom_score_adj).
                .args(["--read-only-port=0", "--healthz-bind-address=127.0.0.1", "--oom-score-adj=0"])
                // The lab's disk is shared and often nearly full: no eviction and no image garbage collection.
                .arg("--eviction-hard=memory.available<50Mi,nodefs.available<1%,imagefs.available<1%")
                .args(["--image-gc-high-threshold=100", "--image-gc-low-threshold=99"]),
        )?;
        // --conntrack-*=0 leaves the kernel's conntrack settings alone; --oom-score-adj as the kubelet's.
        self.spawn(
            "kube-proxy",
            Command::new(bin.join("kube-proxy"))
                .arg(format!("--kubeconfig={}", proxy_config.display()))
                .arg(format!("--hostname-override={NODE_NAME}"))
                .args(["--proxy-mode=iptables", &format!("--cluster-cidr={POD_CIDR}")])
                .arg(format!("--nodeport-addresses={NODE_ADDRESS}/32"))
                .args(["--metrics-bind-address=127.0.0.1:10249", "--healthz-bind-address=127.0.0.1:10256"])
                .args(["--conntrack-max-per-core=0", "--conntrack-tcp-timeout-established=0"])
                .args(["--conntrack-tcp-timeout-close-wait=0", "--oom-score-adj=0"]),
        )
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let nodes: Api<NodeObject> = Api::all(self.client(crate::cluster::ADMIN).await?);
        let started = Instant::now();
        loop {
            self.check_alive()?;
            let ready = nodes.get_opt(NODE_NAME).await.ok().flatten().is_some_and(|n| {
                let conditions = n.status.and_then(|s| s.conditions).unwrap_or_default();
                conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True")
            });
            if ready {
                return Ok(());
            }
            if started.elapsed() > READY_TIMEOUT {
                bail!("node {NODE_NAME} not Ready within {READY_TIMEOUT:?}; kubelet: {}", self.log("kubelet"));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Stops everything in order and removes the node's host-wide state; returns the steps that failed.
    fn teardown(&mut self) -> Vec<String> {
        if std::mem::replace(&mut self.stopped, true) {
            return Vec::new();
        }
        let mut errors = Vec::new();
        let socket = self.containerd_socket();
        // The kubelet and kube-proxy first: nothing recreates what is removed next.
        for name in ["kubelet", "kube-proxy"] {
            self.kill(name);
        }
        // containerd's shims outlive containerd: kill every task while containerd can still reach them.
        let shims = processes_mentioning(&socket);
        if self.processes.iter().any(|p| p.name == "containerd") {
            let ctr = |args: &[&str]| {
                Command::new("ctr").arg("--address").arg(&socket).args(["-n", "k8s.io"]).args(args).output()
            };
            let ids = ctr(&["containers", "ls", "-q"]).map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
            for id in ids.unwrap_or_default().lines() {
                let _ = ctr(&["tasks", "delete", "--force", id]);
            }
        }
        for name in ["containerd", "kube-scheduler", "kube-controller-manager"] {
            self.kill(name);
        }
        for pid in shims {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::SIGKILL);
        }
        // The API server before etcd (Cluster's drop): killed together, the API server hangs in shutdown.
        drop(self.cluster.take());
        if let Err(e) = unmount_under(self.dir.path(), &self.before.netns) {
            errors.push(format!("unmounting the node's mounts: {e:#}"));
        }
        if let Err(e) = remove_lab_state() {
            errors.push(format!("removing the lab's host state: {e:#}"));
        }
        for (name, value) in &self.before.sysctls {
            let path = Path::new("/proc/sys").join(name);
            if std::fs::read_to_string(&path).is_ok_and(|now| now.trim() != value)
                && let Err(e) = std::fs::write(&path, value)
            {
                errors.push(format!("restoring {name} to {value}: {e}"));
            }
        }
        for (path, existed) in &self.before.paths {
            let path = Path::new(path);
            if !existed
                && path.exists()
                && let Err(e) = std::fs::remove_dir_all(path)
            {
                errors.push(format!("removing {}: {e}", path.display()));
            }
        }
        for e in &errors {
            tracing::warn!("node teardown: {e}");
        }
        errors
    }

    fn kill(&mut self, name: &str) {
        for p in self.processes.iter_mut().filter(|p| p.name == name) {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Fails, naming what to do, when the node cannot run here: not root, or a binary missing.
fn preflight() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the node lab needs root (iptables, mounts, cgroups); run the tests as root");
    }
    let bin = crate::cluster::kube_bin_dir();
    let kube = ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kube-proxy", "kubelet"];
    let host = ["/usr/bin/containerd", "/usr/bin/ctr", "/usr/sbin/runc", "/usr/sbin/iptables"];
    let missing: Vec<PathBuf> = kube
        .iter()
        .map(|b| bin.join(b))
        .chain(host.iter().map(PathBuf::from))
        .chain(["bridge", "host-local", "loopback"].iter().map(|p| Path::new(CNI_BIN_DIR).join(p)))
        .filter(|p| !p.is_file())
        .collect();
    if !missing.is_empty() {
        bail!("the node lab is missing {missing:?}; run scripts/lib/install-kube.sh (scripts/test.sh does)");
    }
    Ok(())
}

/// Waits for, then holds, the machine's node lock.
fn lock_machine() -> Result<Flock<std::fs::File>> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK_FILE)
        .with_context(|| format!("opening the node lab's lock {LOCK_FILE}"))?;
    Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| anyhow::anyhow!("locking {LOCK_FILE}: {e}"))
}

/// Runs a host tool that must succeed.
fn run(tool: &str, args: &[&str]) -> Result<()> {
    output(tool, args).map(drop)
}

/// Runs a host tool that must succeed; returns its stdout.
fn output(tool: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(tool).args(args).output().with_context(|| format!("cannot run {tool}"))?;
    if !out.status.success() {
        bail!("{tool} {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn lo_has_node_address() -> bool {
    output("ip", &["-4", "-o", "addr", "show", "dev", "lo"]).is_ok_and(|o| o.contains(&format!("{NODE_ADDRESS}/32")))
}

/// The lab's chains in one table: the guard's, the kubelet's and kube-proxy's (`KUBE-*`; `kube-proxy --cleanup`
/// leaves the kubelet's).
fn lab_chains(tool: &str, table: &str) -> Result<Vec<String>> {
    let rules = output(tool, &["-t", table, "-S"])?;
    Ok(rules.lines().filter_map(|l| l.strip_prefix("-N ")).filter(|c| is_lab_chain(c)).map(str::to_string).collect())
}

fn is_lab_chain(chain: &str) -> bool {
    chain.starts_with("KUBE-") || chain.starts_with("WUKONG-LAB-")
}

/// Removes the lab's iptables chains (and the rules of other chains that jump to them), the bridge, the node
/// address and the `kubepods` cgroups. What is already gone is skipped.
fn remove_lab_state() -> Result<()> {
    let mut failures = Vec::new();
    for tool in ["iptables", "ip6tables"] {
        for table in ["filter", "nat", "mangle"] {
            if let Err(e) = remove_chains(tool, table) {
                failures.push(format!("{e:#}"));
            }
        }
    }
    if Path::new("/sys/class/net").join(BRIDGE).exists()
        && let Err(e) = run("ip", &["link", "del", BRIDGE])
    {
        failures.push(format!("{e:#}"));
    }
    if lo_has_node_address()
        && let Err(e) = run("ip", &["addr", "del", &format!("{NODE_ADDRESS}/32"), "dev", "lo"])
    {
        failures.push(format!("{e:#}"));
    }
    for cgroup in kubepods_cgroups() {
        if let Err(e) = remove_cgroup(&cgroup) {
            failures.push(format!("removing cgroup {}: {e}", cgroup.display()));
        }
    }
    if !failures.is_empty() {
        bail!("{}", failures.join("; "));
    }
    Ok(())
}

fn remove_chains(tool: &str, table: &str) -> Result<()> {
    let rules = output(tool, &["-t", table, "-S"])?;
    let chains = lab_chains(tool, table)?;
    for rule in rules.lines().filter_map(|l| l.strip_prefix("-A ")) {
        let words = split_rule(rule);
        let target = words.iter().position(|w| w == "-j" || w == "-g").and_then(|i| words.get(i + 1));
        if !is_lab_chain(&words[0]) && target.is_some_and(|t| is_lab_chain(t)) {
            let args: Vec<&str> = ["-t", table, "-D"].into_iter().chain(words.iter().map(String::as_str)).collect();
            run(tool, &args)?;
        }
    }
    for flag in ["-F", "-X"] {
        for chain in &chains {
            run(tool, &["-t", table, flag, chain])?;
        }
    }
    Ok(())
}

/// The words of one `iptables -S` rule, with double-quoted words (comments) unquoted.
fn split_rule(rule: &str) -> Vec<String> {
    let (mut words, mut word, mut quoted, mut escaped, mut any) = (Vec::new(), String::new(), false, false, false);
    for c in rule.chars() {
        match c {
            _ if escaped => {
                word.push(c);
                escaped = false;
            }
            '\\' if quoted => escaped = true,
            '"' => {
                quoted = !quoted;
                any = true;
            }
            ' ' if !quoted => {
                if any || !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
                any = false;
            }
            _ => word.push(c),
        }
    }
    if any || !word.is_empty() {
        words.push(word);
    }
    words
}

/// The kubelet's `kubepods` cgroups, in every hierarchy (cgroup v1 and the hybrid's unified one).
fn kubepods_cgroups() -> Vec<PathBuf> {
    std::fs::read_dir("/sys/fs/cgroup")
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path().join("kubepods")).filter(|p| p.is_dir()).collect())
        .unwrap_or_default()
}

/// Removes a cgroup and its children, deepest first; a cgroup whose killed processes are still exiting is busy
/// for a moment, so each is retried for up to 10 s.
fn remove_cgroup(cgroup: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(cgroup)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_cgroup(&entry.path())?;
        }
    }
    let started = Instant::now();
    loop {
        match std::fs::remove_dir(cgroup) {
            Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) && started.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(100))
            }
            other => return other,
        }
    }
}

/// Unmounts (lazily, deepest first) the mounts below `dir` (containers' root filesystems, Pods' volumes), below
/// the host paths the node uses, and the network namespaces not in `keep`, and removes those namespaces' files.
fn unmount_under(dir: &Path, keep: &BTreeSet<String>) -> Result<()> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mut points: Vec<String> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mount_point)
        .filter(|p| {
            let netns = p.strip_prefix("/run/netns/").is_some_and(|n| !keep.contains(n));
            netns
                || Path::new(p).starts_with(dir)
                || ["/run/containerd", "/var/lib/kubelet"].iter().any(|h| Path::new(p).starts_with(h))
        })
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    points.dedup();
    for point in &points {
        nix::mount::umount2(point.as_str(), nix::mount::MntFlags::MNT_DETACH)
            .with_context(|| format!("unmounting {point}"))?;
    }
    for netns in std::fs::read_dir("/run/netns").into_iter().flatten().flatten() {
        if !keep.contains(&*netns.file_name().to_string_lossy()) {
            std::fs::remove_file(netns.path())?;
        }
    }
    Ok(())
}

/// A mount point as /proc/self/mountinfo writes it (space, tab, newline and backslash as octal escapes).
fn unescape_mount_point(point: &str) -> String {
    let mut out = String::new();
    let mut rest = point;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        match u8::from_str_radix(rest.get(i + 1..i + 4).unwrap_or_default(), 8) {
            Ok(byte) => {
                out.push(byte as char);
                rest = &rest[i + 4..];
            }
            Err(_) => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Pids of the processes whose command line mentions `path` (containerd's shims name its socket).
fn processes_mentioning(path: &Path) -> Vec<u32> {
    let needle = path.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).replace('\0', " ").contains(&needle))
        })
        .collect()
}

/// Waits until `count` Pods matching `selector` in `namespace` are Running and Ready; returns them. On timeout the
/// error shows each Pod's phase and container states.
pub async fn wait_for_pods(
    client: &kube::Client,
    namespace: &str,
    selector: &str,
    count: usize,
    timeout: Duration,
) -> Result<Vec<Pod>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let started = Instant::now();
    loop {
        let list = pods.list(&ListParams::default().labels(selector)).await?.items;
        let ready: Vec<Pod> = list.iter().filter(|p| is_ready(p)).cloned().collect();
        if ready.len() >= count {
            return Ok(ready);
        }
        if started.elapsed() > timeout {
            let states: Vec<String> = list
                .iter()
                .map(|p| {
                    let status = p.status.clone().unwrap_or_default();
                    format!(
                        "{}: {} {}",
                        p.metadata.name.clone().unwrap_or_default(),
                        status.phase.unwrap_or_default(),
                        serde_json::to_string(&status.container_statuses).unwrap_or_default()
                    )
                })
                .collect();
            bail!("{count} Pods {selector} in {namespace} not Ready within {timeout:?}: {states:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The Pod is Running and its Ready condition is True.
pub fn is_ready(pod: &Pod) -> bool {
    let status = pod.status.as_ref();
    status.and_then(|s| s.phase.as_deref()) == Some("Running")
        && status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_split_into_words_with_quoted_comments() {
        let rule = r#"KUBE-SERVICES -m comment --comment "kubernetes service \"portals\"" -j KUBE-MARK-MASQ"#;
        assert_eq!(
            split_rule(rule),
            ["KUBE-SERVICES", "-m", "comment", "--comment", r#"kubernetes service "portals""#, "-j", "KUBE-MARK-MASQ"]
        );
        assert_eq!(
            split_rule(r#"OUTPUT -m comment --comment "" -j X"#),
            ["OUTPUT", "-m", "comment", "--comment", "", "-j", "X"]
        );
    }

    #[test]
    fn mount_points_are_unescaped() {
        assert_eq!(unescape_mount_point(r"/run/a\040b\134c"), r"/run/a b\c");
        assert_eq!(unescape_mount_point("/plain"), "/plain");
    }
}
