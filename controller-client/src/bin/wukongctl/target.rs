//! Which machine a command talks to: `--agent`, or the guest of a KubeVirt VMI (`--vmi`, with kubectl's
//! `-n/--namespace`, `--kubeconfig` and `--context`), reached over KubeVirt's vsock subresource or a network as its
//! VM's annotations and the `--agent-*` flags say. Every command reaches the agent of the machine it was pointed at,
//! or fails: it never falls back to another one (a release on the wrong machine unmounts the wrong disk).

use crate::UsageError;
use std::path::PathBuf;
use wukong_controller_client::agent_client::{AgentAddress, VsockTls};
use wukong_controller_client::kubevirt::{
    AgentTransport, KubeVirt, RouteOptions, RouteSettings, agent_route, valid_name, valid_namespace,
};

/// Where the agent is. Global: every command takes these.
#[derive(Debug, Clone, clap::Args)]
pub struct TargetArgs {
    /// Agent address: http://IP:PORT, https://IP:PORT, unix:PATH, vsock://CID:PORT (from the VM's host),
    /// hvsock://PATH:PORT (a VMM's hybrid vsock socket) or kubevirt://NS/NAME:PORT[?tls=agent|kubevirt] (KubeVirt's
    /// vsock subresource). Default: the VMI's route with --vmi (where only this flag, not WUKONG_AGENT or
    /// --agent-config, overrides it), else the local socket unix:/run/wukong-agent/agent.sock (root only).
    #[arg(long, global = true, env = "WUKONG_AGENT", value_name = "ADDRESS", help_heading = "Target")]
    pub agent: Option<String>,
    /// With --vmi, how to reach its agent [default: KubeVirt's vsock subresource when the VMI has a vsock CID, else
    /// its network; or its VM's annotation wukong.io/agent-transport, which this flag overrides].
    #[arg(long, global = true, value_enum, value_name = "HOW", help_heading = "Target")]
    pub agent_transport: Option<AgentTransport>,
    /// With --vmi over the network, the network (a name in the VMI's spec.networks) whose interface's IP to dial
    /// [default: the pod network; or the annotation wukong.io/agent-network].
    #[arg(long, global = true, value_name = "NAME", help_heading = "Target")]
    pub agent_network: Option<String>,
    /// With --vmi, the agent's port, TCP or vsock [default: 7443; or the annotation wukong.io/agent-port].
    #[arg(long, global = true, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..), help_heading = "Target")]
    pub agent_port: Option<u16>,
    /// With --vmi over the vsock subresource, who speaks TLS with the guest: agent (this client's mutual TLS, end
    /// to end) or kubevirt (virt-handler; no TLS files needed, the subresource's RBAC decides who may connect)
    /// [default: agent; or the annotation wukong.io/agent-vsock-tls].
    #[arg(long, global = true, value_enum, value_name = "WHO", help_heading = "Target")]
    pub agent_vsock_tls: Option<VsockTls>,
    /// The KubeVirt VMI whose guest to talk to: NAMESPACE/NAME, or NAME with -n.
    #[arg(long, global = true, value_name = "[NS/]NAME", help_heading = "Target")]
    pub vmi: Option<String>,
    /// The VMI's namespace (as kubectl takes it).
    #[arg(long, short = 'n', global = true, value_name = "NS", help_heading = "Target")]
    pub namespace: Option<String>,
    /// The kubeconfig to use (default: $KUBECONFIG, then ~/.kube/config, then the in-cluster account).
    #[arg(long, global = true, value_name = "FILE", help_heading = "Target")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use.
    #[arg(long, global = true, value_name = "NAME", help_heading = "Target")]
    pub context: Option<String>,
}

/// A VMI, by namespace and name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmiRef {
    pub namespace: String,
    pub name: String,
}

impl TargetArgs {
    /// The way to a VMI's agent the flags choose: they win over the VM's annotations.
    pub fn route(&self) -> RouteOptions {
        let overrides = RouteSettings {
            transport: self.agent_transport,
            network: self.agent_network.clone(),
            port: self.agent_port,
            vsock_tls: self.agent_vsock_tls,
        };
        RouteOptions { overrides, ..Default::default() }
    }

    /// The VMI named by `--vmi` and `-n`, checked before anything is contacted.
    pub fn vmi(&self) -> Result<Option<VmiRef>, UsageError> {
        let Some(vmi) = &self.vmi else {
            return Ok(None);
        };
        let (namespace, name) = match vmi.split_once('/') {
            Some((ns, name)) => {
                if let Some(n) = self.namespace.as_deref().filter(|n| *n != ns) {
                    return Err(UsageError(format!("--vmi {vmi} and -n {n} name different namespaces")));
                }
                (ns.to_string(), name.to_string())
            }
            None => match &self.namespace {
                Some(ns) => (ns.clone(), vmi.clone()),
                None => {
                    return Err(UsageError(format!(
                        "--vmi {vmi} names no namespace; use --vmi NAMESPACE/{vmi} or -n NAMESPACE"
                    )));
                }
            },
        };
        VmiRef::checked("--vmi", vmi, namespace, name).map(Some)
    }
}

impl VmiRef {
    fn checked(flag: &str, given: &str, namespace: String, name: String) -> Result<Self, UsageError> {
        check_name(flag, "namespace", &namespace, valid_namespace(&namespace), 63, given)?;
        check_name(flag, "VMI name", &name, valid_name(&name), 253, given)?;
        Ok(VmiRef { namespace, name })
    }

    /// A move's target, `--to-vmi [NS/]NAME`: another VMI of the source's namespace, the only one its claim can be
    /// plugged in (a PersistentVolumeClaim never leaves its namespace).
    pub fn move_target(given: &str, source: &VmiRef) -> Result<Self, UsageError> {
        let (namespace, name) = given.split_once('/').unwrap_or((&source.namespace, given));
        let target = Self::checked("--to-vmi", given, namespace.into(), name.into())?;
        if target.namespace != source.namespace {
            return Err(UsageError(format!(
                "--to-vmi {given} is in namespace {}, the source VMI in {}: a move stays in its namespace, since a \
                 claim cannot leave it",
                target.namespace, source.namespace
            )));
        }
        if target == *source {
            return Err(UsageError(format!(
                "--to-vmi {given} is the source VMI {}/{}; a move goes to another VM",
                source.namespace, source.name
            )));
        }
        Ok(target)
    }
}

/// Kubernetes' names: lowercase letters, digits and '-' (and '.' in a VMI's name), starting and ending with a
/// letter or digit.
fn check_name(flag: &str, what: &str, value: &str, fine: bool, max: usize, given: &str) -> Result<(), UsageError> {
    match fine {
        true => Ok(()),
        false => Err(UsageError(format!(
            "{flag} {given}: {value:?} is not a valid {what} (lowercase letters, digits and '-', at most {max} \
             characters, starting and ending with a letter or digit); use {flag} NAMESPACE/NAME"
        ))),
    }
}

/// The agent of a VMI's guest: the way to it its VM's annotations and `route` (the --agent-* flags) say.
pub async fn vmi_agent(
    (client, url): &(kube::Client, String),
    vmi: &VmiRef,
    route: &RouteOptions,
) -> anyhow::Result<AgentAddress> {
    let kubevirt = KubeVirt::new(client.clone(), &vmi.namespace, &vmi.name, false).with_api_url(url);
    let (found, vm) = kubevirt.vmi_and_vm().await?;
    Ok(agent_route(vm.as_ref(), &found, route)?)
}

/// A Kubernetes client as kubectl would build it from these flags, and the API server's URL for messages.
pub async fn kube_client(args: &TargetArgs) -> anyhow::Result<(kube::Client, String)> {
    use kube::config::{Config, KubeConfigOptions, Kubeconfig};
    let options = KubeConfigOptions { context: args.context.clone(), ..Default::default() };
    let config = match &args.kubeconfig {
        Some(path) => {
            // Read here, not by kube, whose error quotes the path a second time.
            let text = std::fs::read_to_string(path)
                .map_err(|e| UsageError(format!("cannot use the kubeconfig {}: {e}", path.display())))?;
            let kubeconfig = Kubeconfig::from_yaml(&text)
                .map_err(|e| UsageError(format!("cannot use the kubeconfig {}: {e}", path.display())))?;
            Config::from_custom_kubeconfig(kubeconfig, &options).await.map_err(|e| UsageError(e.to_string()))?
        }
        None if args.context.is_some() => {
            Config::from_kubeconfig(&options).await.map_err(|e| UsageError(e.to_string()))?
        }
        None => Config::infer()
            .await
            .map_err(|e| anyhow::anyhow!("cannot find a kubeconfig or an in-cluster account: {e}"))?,
    };
    let url = config.cluster_url.to_string();
    let client = kube::Client::try_from(config)
        .map_err(|e| anyhow::anyhow!("cannot build a Kubernetes client for {url}: {e}"))?;
    Ok((client, url.trim_end_matches('/').to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(vmi: Option<&str>, namespace: Option<&str>) -> TargetArgs {
        TargetArgs {
            agent: None,
            agent_transport: None,
            agent_network: None,
            agent_port: None,
            agent_vsock_tls: None,
            vmi: vmi.map(str::to_string),
            namespace: namespace.map(str::to_string),
            kubeconfig: None,
            context: None,
        }
    }

    #[test]
    fn a_vmi_needs_a_namespace_and_valid_names() {
        let vmi = |ns: &str, name: &str| Some(VmiRef { namespace: ns.into(), name: name.into() });
        assert_eq!(args(Some("prod/pg-0"), None).vmi().unwrap(), vmi("prod", "pg-0"));
        assert_eq!(args(Some("pg-0"), Some("prod")).vmi().unwrap(), vmi("prod", "pg-0"));
        assert_eq!(args(Some("prod/pg-0"), Some("prod")).vmi().unwrap(), vmi("prod", "pg-0"));
        assert_eq!(args(None, Some("prod")).vmi().unwrap(), None);
        for (vmi, ns, says) in [
            ("pg-0", None, "names no namespace"),
            ("prod/pg-0", Some("dev"), "name different namespaces"),
            ("prod/pg/0", None, "is not a valid VMI name"),
            ("/pg-0", None, "is not a valid namespace"),
            ("prod/", None, "is not a valid VMI name"),
            ("Prod/pg-0", None, "is not a valid namespace"),
            ("prod/-pg", None, "is not a valid VMI name"),
        ] {
            let err = args(Some(vmi), ns).vmi().unwrap_err().to_string();
            assert!(err.contains(says), "{vmi} {ns:?}: {err}");
        }
    }

    #[test]
    fn a_move_target_is_another_vmi_of_the_sources_namespace() {
        let source = VmiRef { namespace: "prod".into(), name: "pg-0".into() };
        let pg1 = VmiRef { namespace: "prod".into(), name: "pg-1".into() };
        assert_eq!(VmiRef::move_target("pg-1", &source).unwrap(), pg1);
        assert_eq!(VmiRef::move_target("prod/pg-1", &source).unwrap(), pg1);
        for (given, says) in [
            ("dev/pg-1", "a move stays in its namespace, since a claim cannot leave it"),
            ("pg-0", "is the source VMI prod/pg-0"),
            ("prod/pg-0", "is the source VMI"),
            ("prod/-pg", "--to-vmi prod/-pg: \"-pg\" is not a valid VMI name"),
            ("Prod/pg-1", "use --to-vmi NAMESPACE/NAME"),
        ] {
            let err = VmiRef::move_target(given, &source).unwrap_err().to_string();
            assert!(err.contains(says), "{given}: {err}");
        }
    }
}
