//! KubeVirt's CRDs (schemas generated from KubeVirt v1.9's OpenAPI document) in the lab's genuine API server: they
//! become Established, keep every field the project reads and writes, and the API server validates and prunes
//! KubeVirt objects with them as it does in a cluster with KubeVirt installed.
//!
//! Without the API server's binaries these tests fail with the reason (`Cluster::start`), they are never skipped.

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
use serde_json::{Value, json};
use wukong_e2e::cluster::{ADMIN, Cluster};
use wukong_e2e::kubevirt_crds;

const NAMESPACE: &str = "kv";

/// A cluster with the CRDs installed and namespace `kv`, and an admin client.
async fn cluster() -> Result<(Cluster, kube::Client)> {
    let cluster = Cluster::start(&[]).await?;
    let client = cluster.client(ADMIN).await?;
    kubevirt_crds::install(&client).await?;
    let namespace = serde_json::from_value::<Namespace>(json!({"metadata": {"name": NAMESPACE}}))?;
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &namespace).await?;
    Ok((cluster, client))
}

fn api(client: &kube::Client, group: &str, version: &str, kind: &str, plural: &str) -> Api<DynamicObject> {
    let resource = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
    Api::namespaced_with(client.clone(), NAMESPACE, &resource)
}

fn vms(client: &kube::Client) -> Api<DynamicObject> {
    api(client, "kubevirt.io", "v1", "VirtualMachine", "virtualmachines")
}

fn vmis(client: &kube::Client) -> Api<DynamicObject> {
    api(client, "kubevirt.io", "v1", "VirtualMachineInstance", "virtualmachineinstances")
}

fn object(value: Value) -> Result<DynamicObject> {
    Ok(serde_json::from_value(value)?)
}

/// A VirtualMachine as the project writes one: a hot-plugged claim and data volume beside a boot data volume, the
/// disks with serials and buses.
fn vm(name: &str) -> Value {
    json!({
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app": "wukong"}},
        "spec": {
            "runStrategy": "Manual",
            "dataVolumeTemplates": [{
                "metadata": {"name": format!("{name}-root"), "labels": {"kubevirt.io/created-by": "wukong"}},
                "spec": {"source": {"blank": {}}, "storage": {"resources": {"requests": {"storage": "1Gi"}}}},
            }],
            "template": {
                "metadata": {"labels": {"kubevirt.io/vm": name}},
                "spec": {
                    "domain": {
                        "devices": {"disks": [
                            {"name": "root", "disk": {"bus": "virtio"}},
                            {"name": "data1", "serial": "data1", "disk": {"bus": "scsi"}},
                            {"name": "data2", "serial": "data2", "disk": {"bus": "scsi"}},
                        ]},
                        "resources": {"requests": {"memory": "128Mi", "cpu": 1}},
                    },
                    "volumes": [
                        {"name": "root", "dataVolume": {"name": format!("{name}-root")}},
                        {"name": "data1", "persistentVolumeClaim": {"claimName": "pvc-a", "hotpluggable": true}},
                        {"name": "data2", "dataVolume": {"name": "dv-b", "hotpluggable": true}},
                    ],
                },
            },
        },
    })
}

/// The status KubeVirt reports for a VMI with a hot-plugged volume.
fn vmi_status() -> Value {
    json!({
        "phase": "Running",
        "nodeName": "node-1",
        "interfaces": [{"name": "default", "interfaceName": "eth0", "ipAddress": "10.244.0.12",
                        "ipAddresses": ["10.244.0.12"], "mac": "52:54:00:12:34:56"}],
        "volumeStatus": [
            {"name": "root", "target": "vda", "phase": "Ready", "reason": "VolumeReady",
             "message": "Volume root is ready"},
            {"name": "data1", "target": "sda", "phase": "Ready", "reason": "VolumeReady",
             "message": "Successfully attach hotplugged volume data1 to VM",
             "hotplugVolume": {"attachPodName": "hp-volume-x7k2p", "attachPodUID": "7b3f0c1e-0000-4000-8000-000000000001"},
             "persistentVolumeClaimInfo": {"claimName": "pvc-a", "accessModes": ["ReadWriteOnce"],
                                           "capacity": {"storage": "1Gi"}, "volumeMode": "Filesystem"}},
            // Not attached yet: KubeVirt writes its empty target.
            {"name": "data2", "target": "", "phase": "Bound", "reason": "", "hotplugVolume": {}},
        ],
        "conditions": [{"type": "Ready", "status": "True", "lastProbeTime": null,
                        "lastTransitionTime": "2025-01-01T00:00:00Z"}],
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn kubevirt_crds_are_established_and_keep_what_the_project_uses() -> Result<()> {
    let (_cluster, client) = cluster().await?;
    // Installing again is a no-op apply: a lab may install into a cluster that already has them.
    kubevirt_crds::install(&client).await?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in ["virtualmachines.kubevirt.io", "virtualmachineinstances.kubevirt.io"] {
        let crd = crds.get(name).await?;
        let stored = serde_json::to_string(&crd)?.len();
        let conditions = crd.status.and_then(|s| s.conditions).unwrap_or_default();
        println!("{name}: Established; {stored} bytes as stored (with managedFields)");
        assert!(conditions.iter().any(|c| c.type_ == "Established" && c.status == "True"), "{name}: {conditions:?}");
    }

    let created = vms(&client).create(&PostParams::default(), &object(vm("vm1"))?).await?;
    let read = vms(&client).get("vm1").await?;
    assert_eq!(read.data["spec"], vm("vm1")["spec"], "the VirtualMachine's spec reads back as written");
    assert_eq!(serde_json::to_value(&read.metadata.labels)?, json!({"app": "wukong"}));

    // The VMI KubeVirt would start for vm1, owned by it. Its CRD has no status subresource, as KubeVirt ships it:
    // the status is part of the object, written with it.
    let mut vmi = json!({
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {"name": "vm1", "namespace": NAMESPACE, "ownerReferences": [{
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "name": "vm1",
            "uid": created.metadata.uid.clone().context("the VM has no uid")?,
            "controller": true, "blockOwnerDeletion": true,
        }]},
        "spec": vm("vm1")["spec"]["template"]["spec"].clone(),
    });
    vmi["status"] = json!({"phase": "Scheduled"});
    vmis(&client).create(&PostParams::default(), &object(vmi.clone())?).await?;
    let read = vmis(&client).get("vm1").await?;
    assert_eq!(read.data["status"], vmi["status"], "the status is the object's, created with it: {:?}", read.data);
    assert_eq!(read.data["spec"], vmi["spec"]);
    let owners = serde_json::to_value(&read.metadata.owner_references)?;
    assert_eq!(owners, vmi["metadata"]["ownerReferences"]);

    // There is no /status to write to.
    let mut current = vmis(&client).get("vm1").await?;
    current.data["status"] = vmi_status();
    match vmis(&client).replace_status("vm1", &PostParams::default(), &current).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 404, "{status:?}"),
        other => bail!("a PUT of the VMI's /status was not refused with 404: {other:?}"),
    }
    // A PUT of the whole object writes it, as virt-handler does. In a merge patch the `lastProbeTime: null` KubeVirt
    // writes would mean "remove".
    vmis(&client).replace("vm1", &PostParams::default(), &current).await?;
    let read = vmis(&client).get("vm1").await?;
    assert_eq!(read.data["status"], vmi_status(), "the VMI's status reads back as written with the object");
    assert_eq!(read.data["spec"], vmi["spec"], "a status write leaves the spec alone");

    // `kubectl get vmi` shows KubeVirt's columns.
    let request = http::Request::get(format!("/apis/kubevirt.io/v1/namespaces/{NAMESPACE}/virtualmachineinstances"))
        .header("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
        .body(Vec::new())?;
    let table: Value = serde_json::from_str(&client.request_text(request).await?)?;
    let columns: Vec<&str> =
        table["columnDefinitions"].as_array().context("a Table")?.iter().filter_map(|c| c["name"].as_str()).collect();
    let row: Vec<(&str, &Value)> = columns.iter().copied().zip(table["rows"][0]["cells"].as_array().unwrap()).collect();
    for (column, value) in [("Name", "vm1"), ("Phase", "Running"), ("IP", "10.244.0.12"), ("Ready", "True")] {
        assert!(row.contains(&(column, &json!(value))), "{column} should be {value}: {row:?}");
    }

    // KubeVirt ships no DataVolume CRD: a cluster without CDI serves none.
    assert!(crds.get_opt("datavolumes.cdi.kubevirt.io").await?.is_none(), "DataVolumes are CDI's");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn kubevirt_crds_refuse_wrong_types_and_prune_unknown_fields() -> Result<()> {
    let (_cluster, client) = cluster().await?;

    let mut wrong = vm("vm-wrong");
    wrong["spec"]["template"]["spec"]["domain"]["devices"]["disks"][1]["serial"] = json!(5);
    match vms(&client).create(&PostParams::default(), &object(wrong)?).await {
        Err(kube::Error::Api(status)) => {
            println!("a serial that is a number: {} {}", status.code, status.message);
            assert_eq!(status.code, 422, "{status:?}");
            assert!(status.message.contains("spec.template.spec.domain.devices.disks"), "{}", status.message);
            assert!(status.message.contains("serial"), "{}", status.message);
        }
        other => bail!("a serial that is a number was not refused with 422: {other:?}"),
    }

    let mut sent = vm("vm-pruned");
    sent["spec"]["template"]["spec"]["domain"]["devices"]["disks"][1]["wukongUnknown"] = json!("dropped");
    sent["spec"]["template"]["spec"]["volumes"][1]["persistentVolumeClaim"]["wukongUnknown"] = json!(true);
    // Embedded metadata is kept whole, as KubeVirt's CRDs keep it: the unknown fields did reach the API server, and
    // it pruned them only where KubeVirt's types say what may be there.
    sent["spec"]["template"]["metadata"]["wukongKept"] = json!("kept");
    vms(&client).create(&PostParams::default(), &object(sent.clone())?).await?;
    let stored = vms(&client).get("vm-pruned").await?.data;
    let template = &stored["spec"]["template"];
    println!(
        "sent disk {}, stored {}",
        sent["spec"]["template"]["spec"]["domain"]["devices"]["disks"][1],
        template["spec"]["domain"]["devices"]["disks"][1]
    );
    assert_eq!(
        template["spec"]["domain"]["devices"]["disks"][1],
        json!({"name": "data1", "serial": "data1", "disk": {"bus": "scsi"}})
    );
    assert_eq!(
        template["spec"]["volumes"][1],
        json!({"name": "data1", "persistentVolumeClaim": {"claimName": "pvc-a", "hotpluggable": true}})
    );
    assert_eq!(template["metadata"]["wukongKept"], "kept");
    Ok(())
}
