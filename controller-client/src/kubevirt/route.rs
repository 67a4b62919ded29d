//! How the agent in a VMI's guest is reached, per VM. Unless configured: KubeVirt's vsock subresource when the VMI
//! has a vsock CID (a guest with no network of its own is reached that way too), else TCP to the IP of its pod
//! network's interface. Annotations on the VM (else on the VMI) configure one VM; the caller's settings configure
//! the others (the operator's flags), or all of them (wukongctl's flags, which win over annotations).

use super::{DEFAULT_POD_NETWORK, VirtualMachine, VirtualMachineInstance};
use crate::address::{AgentAddress, VsockTls};
use clap::ValueEnum;
use std::net::IpAddr;

/// Annotation forcing the transport: `vsock`, `network` (or `auto`, the default).
pub const TRANSPORT_ANNOTATION: &str = "wukong.io/agent-transport";
/// Annotation naming the network (a name in the VMI's `spec.networks`) whose interface's IP the agent is reached
/// at; default: the pod network.
pub const NETWORK_ANNOTATION: &str = "wukong.io/agent-network";
/// Annotation giving the agent's port (TCP or vsock); default 7443.
pub const PORT_ANNOTATION: &str = "wukong.io/agent-port";
/// Annotation choosing who speaks TLS with the guest over KubeVirt's vsock subresource: `agent` (the default: this
/// client's mutual TLS, end to end) or `kubevirt` (virt-handler).
pub const VSOCK_TLS_ANNOTATION: &str = "wukong.io/agent-vsock-tls";

/// Which way to the agent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, ValueEnum)]
pub enum AgentTransport {
    /// KubeVirt's vsock subresource when the VMI has a vsock CID (`status.VSOCKCID`), else the network.
    #[default]
    Auto,
    /// KubeVirt's vsock subresource.
    Vsock,
    /// TCP to the IP of the VMI's interface on a network.
    Network,
}

/// Settings of the way to agents; `None`: not set here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteSettings {
    pub transport: Option<AgentTransport>,
    /// A network of the VMI's `spec.networks`, by name.
    pub network: Option<String>,
    pub port: Option<u16>,
    pub vsock_tls: Option<VsockTls>,
}

/// The caller's settings: `overrides` win over a VM's annotations, which win over `defaults`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteOptions {
    /// What applies where a VM's annotations say nothing (the operator's flags).
    pub defaults: RouteSettings,
    /// What applies whatever the annotations say (wukongctl's flags: what the user typed is what happens).
    pub overrides: RouteSettings,
}

/// Why a VMI's agent cannot be reached the way it is configured, or not yet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("{object} has annotation {annotation}: {value:?}, which is not {allowed}; correct or remove it")]
    BadAnnotation { object: String, annotation: &'static str, value: String, allowed: &'static str },
    #[error(
        "VMI {vmi} has no network named '{network}' (chosen by {by}) to reach its agent on; its networks: {networks}"
    )]
    NoSuchNetwork { vmi: String, network: String, by: String, networks: String },
    #[error(
        "VMI {vmi} has no pod network to reach its agent on (its networks: {networks}); name one with annotation \
         {NETWORK_ANNOTATION} (or --agent-network), or give the VMI a vsock device (autoattachVSOCK)"
    )]
    NoPodNetwork { vmi: String, networks: String },
    #[error(
        "VMI {vmi} has no vsock device (spec.domain.devices.autoattachVSOCK), and {by} asks for the vsock transport; \
         give it one (KubeVirt's VSOCK feature gate), or reach its agent over the network"
    )]
    NoVsock { vmi: String, by: String },
    #[error("VMI {vmi} reports no IP on network '{network}' to reach its agent at yet")]
    NoAddressYet { vmi: String, network: String },
    #[error("VMI {vmi} has no vsock CID (status.VSOCKCID) to reach its agent at yet")]
    NoCidYet { vmi: String },
}

impl RouteError {
    /// The VMI is not there yet (no IP, no CID): waiting helps, unlike a refusal of its configuration.
    pub fn is_pending(&self) -> bool {
        matches!(self, Self::NoAddressYet { .. } | Self::NoCidYet { .. })
    }
}

/// The settings of one VM, as found: the value and who set it (a flag, an annotation, or the default).
struct Found<T> {
    value: T,
    by: String,
}

struct Lookup<'a> {
    vm: Option<&'a VirtualMachine>,
    vmi: &'a VirtualMachineInstance,
    options: &'a RouteOptions,
}

impl Lookup<'_> {
    /// A setting: the override, else the VM's annotation, else the VMI's, else the default.
    fn find<T>(
        &self,
        annotation: &'static str,
        allowed: &'static str,
        field: impl Fn(&RouteSettings) -> Option<T>,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Result<Option<Found<T>>, RouteError> {
        // The flags have the annotations' names: wukong.io/agent-port is --agent-port.
        let flag = format!("--{}", annotation.trim_start_matches("wukong.io/"));
        if let Some(value) = field(&self.options.overrides) {
            return Ok(Some(Found { value, by: flag }));
        }
        let objects = [self.vm.map(|vm| ("VM", &vm.metadata)), Some(("VMI", &self.vmi.metadata))];
        for (kind, metadata) in objects.into_iter().flatten() {
            if let Some(text) = metadata.annotations.get(annotation) {
                let object = format!("{kind} {}/{}", metadata.namespace, metadata.name);
                let value = parse(text.trim()).ok_or_else(|| RouteError::BadAnnotation {
                    object: object.clone(),
                    annotation,
                    value: text.clone(),
                    allowed,
                })?;
                return Ok(Some(Found { value, by: format!("annotation {annotation} of {object}") }));
            }
        }
        Ok(field(&self.options.defaults).map(|value| Found { value, by: flag }))
    }
}

/// One of a flag's values, spelt exactly.
fn enumerated<T: ValueEnum>(text: &str) -> Option<T> {
    T::from_str(text, false).ok()
}

/// The address of the agent in `vmi`'s guest (its VM, when it has one, holds the annotations that win). Every
/// annotation is checked, used or not, so that a mistake is said at once rather than when the VMI changes.
pub fn agent_route(
    vm: Option<&VirtualMachine>,
    vmi: &VirtualMachineInstance,
    options: &RouteOptions,
) -> Result<AgentAddress, RouteError> {
    let lookup = Lookup { vm, vmi, options };
    let transport = lookup.find(TRANSPORT_ANNOTATION, "auto, vsock or network", |s| s.transport, enumerated)?;
    let network = lookup.find(
        NETWORK_ANNOTATION,
        "a network name",
        |s| s.network.clone(),
        |t| (!t.is_empty()).then(|| t.to_string()),
    )?;
    let port = lookup.find(
        PORT_ANNOTATION,
        "a port number from 1 to 65535",
        |s| s.port,
        |text| text.parse::<u16>().ok().filter(|p| *p != 0),
    )?;
    let vsock_tls = lookup.find(VSOCK_TLS_ANNOTATION, VsockTls::ALLOWED, |s| s.vsock_tls, enumerated)?;
    let port = port.map_or(wukong_proto::DEFAULT_PORT, |p| p.value);
    let name = format!("{}/{}", vmi.metadata.namespace, vmi.metadata.name);
    let (transport, by) = transport.map_or((AgentTransport::Auto, String::new()), |t| (t.value, t.by));
    let vsock = match transport {
        AgentTransport::Auto => vmi.status.vsock_cid.is_some(),
        AgentTransport::Vsock => true,
        AgentTransport::Network => false,
    };
    if vsock {
        return match (vmi.status.vsock_cid, vmi.spec.domain.devices.autoattach_vsock) {
            (Some(_), _) => Ok(AgentAddress::KubeVirtVsock {
                namespace: vmi.metadata.namespace.clone(),
                name: vmi.metadata.name.clone(),
                port: port.into(),
                tls: vsock_tls.map_or(VsockTls::Agent, |t| t.value),
            }),
            // virt-controller gives the CID when it schedules the VMI.
            (None, Some(true)) => Err(RouteError::NoCidYet { vmi: name }),
            (None, _) => Err(RouteError::NoVsock { vmi: name, by }),
        };
    }
    let networks: Vec<&str> = vmi.spec.networks.iter().map(|n| n.name.as_str()).collect();
    let listed = match networks.is_empty() {
        true => format!("none listed, so KubeVirt's pod network '{DEFAULT_POD_NETWORK}'"),
        false => networks.join(", "),
    };
    let network = match network {
        Some(Found { value, by }) => {
            let known = networks.contains(&value.as_str()) || (networks.is_empty() && value == DEFAULT_POD_NETWORK);
            if !known {
                return Err(RouteError::NoSuchNetwork { vmi: name, network: value, by, networks: listed });
            }
            value
        }
        // The pod network, by name and never by position: KubeVirt lists the guest's own interfaces too (no name,
        // addresses only the guest can reach, e.g. a Docker bridge), sometimes first.
        None if networks.is_empty() => DEFAULT_POD_NETWORK.to_string(),
        None => match vmi.spec.networks.iter().find(|n| n.pod.is_some()) {
            Some(pod) => pod.name.clone(),
            None => return Err(RouteError::NoPodNetwork { vmi: name, networks: listed }),
        },
    };
    // KubeVirt clears the IP when the guest agent reports none; a value that is not an IP is not dialled either.
    let ip = vmi.status.interfaces.iter().find(|i| i.name == network).and_then(|i| i.ip_address.parse::<IpAddr>().ok());
    match ip {
        Some(IpAddr::V4(ip)) => Ok(AgentAddress::Tcp(format!("http://{ip}:{port}"))),
        Some(IpAddr::V6(ip)) => Ok(AgentAddress::Tcp(format!("http://[{ip}]:{port}"))),
        None => Err(RouteError::NoAddressYet { vmi: name, network }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn vmi(networks: Value, interfaces: Value, annotations: Value) -> VirtualMachineInstance {
        serde_json::from_value(json!({
            "metadata": {"name": "vm1", "namespace": "ns1", "annotations": annotations},
            "spec": {"networks": networks}, "status": {"interfaces": interfaces},
        }))
        .unwrap()
    }

    fn vm(annotations: Value) -> VirtualMachine {
        serde_json::from_value(json!({"metadata": {"name": "vm1", "namespace": "ns1", "annotations": annotations}}))
            .unwrap()
    }

    fn route(vm: Option<&VirtualMachine>, vmi: &VirtualMachineInstance) -> Result<String, RouteError> {
        agent_route(vm, vmi, &RouteOptions::default()).map(|a| a.to_string())
    }

    /// A VMI with a vsock device, as KubeVirt 1.9 stores it.
    fn vsock_vmi(annotations: Value) -> VirtualMachineInstance {
        serde_json::from_value(json!({
            "metadata": {"name": "vm1", "namespace": "ns1", "annotations": annotations},
            "spec": {"domain": {"devices": {"autoattachVSOCK": true}}, "networks": [{"name": "default", "pod": {}}]},
            "status": {"VSOCKCID": 123, "interfaces": [{"name": "default", "ipAddress": "10.244.1.7"}]},
        }))
        .unwrap()
    }

    /// Interfaces as KubeVirt reports them (`status.interfaces`): the pod network's first, by name, then what the
    /// guest agent adds with no name.
    #[test]
    fn the_agent_is_reached_on_the_pod_network_never_at_a_guest_only_address() {
        let none = json!({});
        let pod = json!([{"name": "default", "pod": {}}]);
        let guest_only = json!({"name": "", "ipAddress": "172.17.0.1", "interfaceName": "docker0"});
        let pod_ip = json!({"name": "default", "ipAddress": "10.244.1.7", "interfaceName": "eth0"});
        let both = vmi(pod.clone(), json!([guest_only, pod_ip]), none.clone());
        assert_eq!(route(None, &both).unwrap(), "http://10.244.1.7:7443", "a guest-only address listed first");
        let cleared = json!({"name": "default", "ipAddress": "", "interfaceName": "eth0"});
        let err = route(None, &vmi(pod.clone(), json!([cleared, guest_only]), none.clone())).unwrap_err();
        assert!(err.is_pending(), "no pod IP yet: {err}");
        assert_eq!(err.to_string(), "VMI ns1/vm1 reports no IP on network 'default' to reach its agent at yet");
        let multus = json!([{"name": "default", "pod": {}}, {"name": "storage", "multus": {"networkName": "s"}}]);
        let storage = json!({"name": "storage", "ipAddress": "192.168.5.5"});
        let secondary = vmi(multus.clone(), json!([storage, pod_ip]), none.clone());
        assert_eq!(route(None, &secondary).unwrap(), "http://10.244.1.7:7443", "the pod network, wherever listed");
        let renamed = json!([{"name": "podnet", "pod": {}}]);
        let ipv6 = json!({"name": "podnet", "ipAddress": "fd00::7"});
        assert_eq!(route(None, &vmi(renamed, json!([ipv6]), none.clone())).unwrap(), "http://[fd00::7]:7443");
        let unlisted = vmi(json!([]), json!([pod_ip]), none.clone());
        assert_eq!(route(None, &unlisted).unwrap(), "http://10.244.1.7:7443", "KubeVirt's default pod network");
        let secondary_only = vmi(json!([{"name": "storage", "multus": {"networkName": "s"}}]), json!([storage]), none);
        let err = route(None, &secondary_only).unwrap_err();
        assert!(matches!(err, RouteError::NoPodNetwork { .. }) && !err.is_pending(), "{err}");
        assert!(err.to_string().contains("its networks: storage"), "{err}");
    }

    #[test]
    fn a_named_network_is_the_vms_annotation_else_the_vmis_else_the_flag() {
        let multus = json!([{"name": "default", "pod": {}}, {"name": "storage", "multus": {"networkName": "s"}}]);
        let interfaces =
            json!([{"name": "default", "ipAddress": "10.244.1.7"}, {"name": "storage", "ipAddress": "fd00::5"}]);
        let storage = json!({NETWORK_ANNOTATION: "storage"});
        let on_vmi = vmi(multus.clone(), interfaces.clone(), storage.clone());
        assert_eq!(route(None, &on_vmi).unwrap(), "http://[fd00::5]:7443");
        let pod = vm(json!({NETWORK_ANNOTATION: "default"}));
        assert_eq!(route(Some(&pod), &on_vmi).unwrap(), "http://10.244.1.7:7443", "the VM's annotation wins");
        assert_eq!(route(Some(&vm(json!({}))), &on_vmi).unwrap(), "http://[fd00::5]:7443", "else the VMI's");
        let plain = vmi(multus, interfaces, json!({}));
        let flag = |defaults, overrides| RouteOptions {
            defaults: RouteSettings { network: defaults, ..Default::default() },
            overrides: RouteSettings { network: overrides, ..Default::default() },
        };
        let storage_flag = flag(Some("storage".into()), None);
        assert_eq!(agent_route(None, &plain, &storage_flag).unwrap().to_string(), "http://[fd00::5]:7443");
        assert_eq!(
            agent_route(None, &on_vmi, &flag(Some("default".into()), None)).unwrap().to_string(),
            "http://[fd00::5]:7443",
            "the operator's flag is a default an annotation overrides"
        );
        assert_eq!(
            agent_route(None, &on_vmi, &flag(None, Some("default".into()))).unwrap().to_string(),
            "http://10.244.1.7:7443",
            "wukongctl's flag overrides the annotation"
        );
        let err = agent_route(None, &plain, &flag(Some("backup".into()), None)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "VMI ns1/vm1 has no network named 'backup' (chosen by --agent-network) to reach its agent on; its \
             networks: default, storage"
        );
    }

    #[test]
    fn a_vmi_with_a_vsock_cid_is_reached_over_kubevirts_subresource() {
        let vsock = vsock_vmi(json!({}));
        assert_eq!(route(None, &vsock).unwrap(), "kubevirt://ns1/vm1:7443");
        let address = agent_route(None, &vsock, &RouteOptions::default()).unwrap();
        assert_eq!(address.place(), "over KubeVirt's vsock subresource of VMI ns1/vm1 (port 7443, tls=false)");
        let kubevirt_tls = vm(json!({VSOCK_TLS_ANNOTATION: "kubevirt", PORT_ANNOTATION: "818"}));
        assert_eq!(route(Some(&kubevirt_tls), &vsock).unwrap(), "kubevirt://ns1/vm1:818?tls=kubevirt");
        let network = vm(json!({TRANSPORT_ANNOTATION: "network"}));
        assert_eq!(route(Some(&network), &vsock).unwrap(), "http://10.244.1.7:7443", "forced onto the network");
        let forced = RouteOptions {
            overrides: RouteSettings { transport: Some(AgentTransport::Vsock), ..Default::default() },
            ..Default::default()
        };
        assert_eq!(agent_route(Some(&network), &vsock, &forced).unwrap().to_string(), "kubevirt://ns1/vm1:7443");
    }

    #[test]
    fn forcing_vsock_without_a_device_is_refused_and_without_a_cid_waits() {
        let pod = json!([{"name": "default", "pod": {}}]);
        let plain = vmi(pod, json!([{"name": "default", "ipAddress": "10.0.0.1"}]), json!({}));
        let err = route(Some(&vm(json!({TRANSPORT_ANNOTATION: "vsock"}))), &plain).unwrap_err();
        assert!(!err.is_pending());
        assert!(
            err.to_string().starts_with(
                "VMI ns1/vm1 has no vsock device (spec.domain.devices.autoattachVSOCK), and annotation \
                 wukong.io/agent-transport of VM ns1/vm1 asks for the vsock transport"
            ),
            "{err}"
        );
        let mut scheduling = vsock_vmi(json!({TRANSPORT_ANNOTATION: "vsock"}));
        scheduling.status.vsock_cid = None;
        let err = route(None, &scheduling).unwrap_err();
        assert!(err.is_pending(), "{err}");
        scheduling.metadata.annotations.clear();
        assert_eq!(route(None, &scheduling).unwrap(), "http://10.244.1.7:7443", "auto: the network until a CID");
    }

    /// A mistake in an annotation is a refusal naming the object, the annotation and what it may be, whether or not
    /// the route uses it; a flag of wukongctl makes the annotation irrelevant.
    #[test]
    fn bad_annotations_are_named_refusals() {
        let vsock = vsock_vmi(json!({}));
        let cases = [
            (TRANSPORT_ANNOTATION, "tcp", "auto, vsock or network"),
            (TRANSPORT_ANNOTATION, "Vsock", "auto, vsock or network"),
            (PORT_ANNOTATION, "0", "a port number from 1 to 65535"),
            (PORT_ANNOTATION, "65536", "a port number from 1 to 65535"),
            (PORT_ANNOTATION, "-1", "a port number from 1 to 65535"),
            (VSOCK_TLS_ANNOTATION, "true", "agent or kubevirt"),
            (NETWORK_ANNOTATION, " ", "a network name"),
        ];
        for (annotation, value, allowed) in cases {
            let err = route(Some(&vm(json!({annotation: value}))), &vsock).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "VM ns1/vm1 has annotation {annotation}: {value:?}, which is not {allowed}; correct or remove it"
                )
            );
            assert!(!err.is_pending());
        }
        let typed =
            RouteOptions { overrides: RouteSettings { port: Some(7443), ..Default::default() }, ..Default::default() };
        assert!(agent_route(Some(&vm(json!({PORT_ANNOTATION: "x"}))), &vsock, &typed).is_ok());
        let on_vmi = vsock_vmi(json!({VSOCK_TLS_ANNOTATION: "both"}));
        let err = route(None, &on_vmi).unwrap_err().to_string();
        assert!(err.starts_with("VMI ns1/vm1 has annotation wukong.io/agent-vsock-tls: \"both\""), "{err}");
    }
}
