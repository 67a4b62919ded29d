//! The lab's vsock: a guest with a vsock device and no network at all, reached through its hybrid-vsock socket
//! (tests/src/lib.rs), and the lab's KubeVirt v1.9 playing its `VSOCK` feature (tests/src/kubevirt_vsock.rs): the gate,
//! virt-controller's CIDs, and the `vsock` subresource as a websocket through the genuine API server's aggregator,
//! with virt-handler's TLS and KubeVirt's CA served to the guest.
//!
//! Round trips are printed (`--nocapture`): boot to the first answered CONNECT, and the median of 20 echoes through
//! the hybrid socket and through the subresource.

use anyhow::{Context, Result};
use http_body_util::BodyExt;
use kube::api::{Api, DynamicObject, PostParams};
use rcgen::ExtendedKeyUsagePurpose;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use wukong_controller_client::agent_client::{AgentAddress, AgentClient};
use wukong_e2e::cluster::{ADMIN, Ca, Cluster};
use wukong_e2e::kubevirt_lab::{
    API_SERVER, CONTROLLER, HANDLER, HotplugMode, KubeVirtConfig, KubeVirtLab, VmOptions, resource,
};
use wukong_e2e::kubevirt_vsock::{self, CLIENT_NAME, foreign_client_certificate, host_port_socket};
use wukong_e2e::{Guest, GuestOptions};
use wukong_proto::kubevirt_system::EmptyRequest;
use wukong_proto::kubevirt_system::system_client::SystemClient;

const NS: &str = "vsock";
/// A user with no rights until a test binds some.
const USER: &str = "vsock-user";
const WAIT: Duration = Duration::from_secs(10);

fn vsock_gate() -> KubeVirtConfig {
    KubeVirtConfig { hotplug: HotplugMode::Declarative, vsock: true }
}

/// A guest with a vsock device and no network device at all.
fn without_network() -> GuestOptions {
    GuestOptions { vsock: true, network: false, ..Default::default() }
}

fn vsock_vm(interface_ip: Option<&str>) -> VmOptions {
    VmOptions { interface_ip: interface_ip.map(str::to_string), vsock: true, ..Default::default() }
}

/// A vsock echo service in the guest on `port` (socat, as the guest has it for its control channel), listening.
async fn echo_service(guest: &Guest, port: u32) -> Result<()> {
    guest
        .run_ok(&format!("setsid socat VSOCK-LISTEN:{port},fork,reuseaddr EXEC:cat </dev/null >/dev/null 2>&1 &"))
        .await?;
    guest.vsock_connect(port, WAIT).await.map(drop)
}

/// The median of 20 round trips of 20 bytes over `stream`.
async fn median_round_trip<S>(stream: &mut S) -> Result<Duration>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut times = Vec::new();
    for n in 0..20u8 {
        let message = [b'a' + n; 20];
        let started = Instant::now();
        stream.write_all(&message).await?;
        stream.flush().await?;
        let mut echoed = [0u8; 20];
        tokio::time::timeout(WAIT, stream.read_exact(&mut echoed)).await.context("the echo did not come back")??;
        times.push(started.elapsed());
        assert_eq!(echoed, message);
    }
    times.sort();
    Ok(times[times.len() / 2])
}

/// The subresource's refusal as an error, for a call that must succeed.
fn refused((code, body): (u16, String)) -> anyhow::Error {
    anyhow::anyhow!("the vsock subresource answered {code}: {body}")
}

/// The status code and `metav1.Status` message of a refusal, asked as `user` on a connection of its own:
/// kube-apiserver closes a connection once it has passed on the answer to a refused upgrade, and a pooled client may
/// send its next request on that connection before it sees the close ("connection closed before message completed",
/// seen once in CI).
async fn refusal(cluster: &Cluster, user: &str, vmi: &str, query: &str) -> Result<(u16, String)> {
    let client = cluster.client(user).await?;
    match kubevirt_vsock::open(&client, NS, vmi, query).await? {
        Ok(_) => anyhow::bail!("the vsock subresource of {vmi} accepted {query:?}"),
        Err((code, body)) => {
            let status: Value = serde_json::from_str(&body).with_context(|| format!("a Status: {body}"))?;
            assert_eq!((status["kind"].as_str(), status["code"].as_u64()), (Some("Status"), Some(code.into())));
            Ok((code, status["message"].as_str().unwrap_or_default().to_string()))
        }
    }
}

/// Reads until the stream ends (a clean end or an error), for at most [`WAIT`]; returns what came.
async fn read_to_end<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> Result<Vec<u8>> {
    let mut data = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut data)).await.context("the stream did not end")?;
    Ok(data)
}

fn vmis(client: &kube::Client) -> Api<DynamicObject> {
    let r = resource("VirtualMachineInstance", "kubevirt.io", "v1", "virtualmachineinstances");
    Api::namespaced_with(client.clone(), NS, &r)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_guest_without_a_network_is_reached_over_vsock() -> Result<()> {
    let guest = Guest::boot_with_options(&without_network()).await?;
    let ready = guest.vsock_ready().context("a vsock guest's boot is measured")?;
    eprintln!("boot to the first answered CONNECT: {ready:?}");

    // Guest::run works over vsock alone: the guest has no network device at all.
    assert_eq!(guest.run_ok("ls /sys/class/net").await?.trim(), "lo");
    let out = guest.run("echo out; echo err >&2; exit 3").await?;
    assert_eq!((out.output.as_str(), out.status), ("out\nerr\n", 3));

    echo_service(&guest, 5000).await?;
    let mut stream = guest.vsock_connect(5000, WAIT).await?;
    let median = median_round_trip(&mut stream).await?;
    eprintln!("vsock echo round trip through the hybrid socket, median of 20: {median:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_guest_with_a_network_and_vsock_has_both() -> Result<()> {
    // The agent listens on both by default: 0.0.0.0:7443 and vsock://7443.
    let guest = Guest::boot_with_options(&GuestOptions { vsock: true, ..Default::default() }).await?;
    guest.agent().agent_info().await.context("the agent over the network")?;
    let address = AgentAddress::HybridVsock { path: guest.vsock_socket(), port: 7443 };
    let info = AgentClient::connect(address)?.agent_info().await.context("the agent over vsock")?;
    assert_eq!(info.hostname, "wukong-lab", "the same agent");
    assert!(guest.run_ok("ls /sys/class/net").await?.split_whitespace().any(|n| n != "lo"), "a NIC");
    echo_service(&guest, 5000).await?;
    median_round_trip(&mut guest.vsock_connect(5000, WAIT).await?).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn without_the_vsock_gate_kubevirt_admits_no_vsock() -> Result<()> {
    let cluster = Cluster::start(&[API_SERVER, CONTROLLER, HANDLER]).await?;
    let kubevirt = KubeVirtLab::start(&cluster, None, NS, HotplugMode::Declarative).await?;
    // A standalone VMI meets the VMI create admitter, a VM the VM admitter (its template's spec).
    for (owned, webhook) in [
        (false, "virtualmachineinstances-create-validator.kubevirt.io"),
        (true, "virtualmachine-validator.kubevirt.io"),
    ] {
        let error = kubevirt.create_vm_with("vm1", owned, &vsock_vm(None)).await.unwrap_err();
        let status = match error.downcast_ref::<kube::Error>() {
            Some(kube::Error::Api(status)) => status,
            _ => anyhow::bail!("not a refusal of the API server: {error:#}"),
        };
        let expected = format!(
            "admission webhook \"{webhook}\" denied the request: VSOCK feature gate is not enabled in kubevirt-config"
        );
        assert_eq!((status.code, status.message.as_str()), (422, expected.as_str()));
    }
    kubevirt.create_vm_with("plain", true, &VmOptions::default()).await.context("no vsock, no refusal")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn kubevirt_gives_vsock_vmis_unique_cids_and_refuses_as_v1_9() -> Result<()> {
    let cluster = Cluster::start(&[API_SERVER, CONTROLLER, HANDLER, USER]).await?;
    let kubevirt = KubeVirtLab::start_with(&cluster, None, NS, vsock_gate()).await?;
    let admin = cluster.client(ADMIN).await?;
    kubevirt.create_vm_with("quiet", true, &vsock_vm(None)).await?;
    kubevirt.create_vm_with("talker", false, &vsock_vm(Some("10.0.2.15"))).await?;
    kubevirt
        .create_vm_with("plain", true, &VmOptions { interface_ip: Some("10.0.2.16".into()), ..Default::default() })
        .await?;

    let status = |vmi: DynamicObject| vmi.data["status"].clone();
    let (quiet, talker, plain) = (
        status(vmis(&admin).get("quiet").await?),
        status(vmis(&admin).get("talker").await?),
        status(vmis(&admin).get("plain").await?),
    );
    let cid = |status: &Value| status["VSOCKCID"].as_u64();
    let (a, b) = (cid(&quiet).context("quiet's CID")?, cid(&talker).context("talker's CID")?);
    assert!(a >= 3 && b >= 3 && a != b, "CIDs {a} and {b}");
    assert_eq!(cid(&plain), None, "no vsock, no CID");
    assert_eq!(quiet["interfaces"], Value::Null, "a VMI without networking reports no interface");
    assert_eq!(talker["interfaces"][0]["ipAddress"], "10.0.2.15");

    // virt-api's refusals, its own and virt-handler's (through virt-api's failed websocket handshake).
    assert_eq!(
        refusal(&cluster, ADMIN, "gone", "port=1").await?,
        (404, r#"virtualmachineinstance.kubevirt.io "gone" not found"#.into())
    );
    assert_eq!(refusal(&cluster, ADMIN, "plain", "port=1").await?, (400, "VSOCK is not attached.".into()));
    let handler =
        "Internal error occurred: Can't connect to websocket (400): websocket: bad handshake: application info";
    assert_eq!(
        refusal(&cluster, ADMIN, "quiet", "tls=false").await?,
        (500, format!(r#"{handler}: strconv.ParseUint: parsing "": invalid syntax"#))
    );
    assert_eq!(
        refusal(&cluster, ADMIN, "quiet", "port=70000000000").await?,
        (500, format!(r#"{handler}: strconv.ParseUint: parsing "70000000000": value out of range"#))
    );
    assert_eq!(
        refusal(&cluster, ADMIN, "quiet", "port=1&tls=maybe").await?,
        (500, format!(r#"{handler}: strconv.ParseBool: parsing "maybe": invalid syntax"#))
    );
    // Not a websocket: gorilla's refusal, then virt-api's Status.
    let path = format!("/apis/subresources.kubevirt.io/v1/namespaces/{NS}/virtualmachineinstances/quiet/vsock?port=1");
    let plain_get = admin.send(http::Request::get(path).body(kube::client::Body::empty())?).await?;
    assert_eq!(plain_get.status(), 400);
    let body = plain_get.into_body().collect().await?.to_bytes();
    assert!(body.starts_with(b"Bad Request\n"), "{}", String::from_utf8_lossy(&body));

    // A VMI whose guest has no vsock device (the lab has no guest here): upgraded, then closed without a byte, as
    // virt-handler dials only after its own upgrade.
    let mut stream = kubevirt_vsock::open(&admin, NS, "quiet", "port=1&tls=false").await?.map_err(refused)?;
    assert!(read_to_end(&mut stream).await?.is_empty());

    // RBAC before the request reaches virt-api: KubeVirt's roles do not grant the subresource.
    let user = cluster.client(USER).await?;
    let (code, message) = refusal(&cluster, USER, "quiet", "port=1").await?;
    assert_eq!(code, 403, "{message}");
    assert!(
        message
            .contains(r#"cannot get resource "virtualmachineinstances/vsock" in API group "subresources.kubevirt.io""#),
        "{message}"
    );
    grant_vsock(&admin, USER).await?;
    kubevirt_vsock::open(&user, NS, "quiet", "port=1&tls=false").await?.map_err(refused)?;
    Ok(())
}

/// A Role with `get` on `virtualmachineinstances/vsock`, bound to `user` in NS: what a client of the subresource
/// needs of its own.
async fn grant_vsock(admin: &kube::Client, user: &str) -> Result<()> {
    let rbac = |kind: &str, plural: &str| {
        Api::<DynamicObject>::namespaced_with(
            admin.clone(),
            NS,
            &resource(kind, "rbac.authorization.k8s.io", "v1", plural),
        )
    };
    let role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "vsock"},
                      "rules": [{"apiGroups": ["subresources.kubevirt.io"],
                                 "resources": ["virtualmachineinstances/vsock"], "verbs": ["get"]}]});
    let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                         "metadata": {"name": "vsock"},
                         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "vsock"},
                         "subjects": [{"kind": "User", "name": user, "apiGroup": "rbac.authorization.k8s.io"}]});
    rbac("Role", "roles").create(&PostParams::default(), &serde_json::from_value(role)?).await?;
    rbac("RoleBinding", "rolebindings").create(&PostParams::default(), &serde_json::from_value(binding)?).await?;
    // RBAC takes a moment to see new bindings.
    wukong_e2e::until("the vsock grant", WAIT, || async {
        let client = admin.clone();
        let review = json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
                            "spec": {"user": user, "resourceAttributes": {"namespace": NS, "verb": "get",
                                     "group": "subresources.kubevirt.io", "resource": "virtualmachineinstances",
                                     "subresource": "vsock"}}});
        let request = http::Request::post("/apis/authorization.k8s.io/v1/subjectaccessreviews")
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&review)?)?;
        let answer: Value = client.request(request).await?;
        Ok(match answer["status"]["allowed"] == true {
            true => Ok(()),
            false => Err(answer["status"].to_string()),
        })
    })
    .await
}

/// Writes `text` to `path` in the guest.
async fn write_file(guest: &Guest, path: &str, text: &str) -> Result<()> {
    guest.run_ok(&format!("cat > {path} <<'WUKONG-FILE'\n{text}\nWUKONG-FILE\n")).await?;
    Ok(())
}

/// A TLS service in the guest on vsock port `port`, as a guest agent with `tls=true` serves one: OpenSSL (socat)
/// accepting TLS 1.3 only, from clients with a certificate KubeVirt's CA signed for client auth; it first says the
/// client's common name on a line, then echoes. socat's OpenSSL listens on TCP only, so a second socat relays vsock
/// to it over `lo`. Returns once both listen.
async fn tls_service(guest: &Guest, kubevirt_ca: &str, port: u32) -> Result<()> {
    let server = Ca::new("guest")?.leaf("guest", &["guest"], ExtendedKeyUsagePurpose::ServerAuth)?;
    write_file(guest, "/tmp/tls.crt", &server.cert).await?;
    write_file(guest, "/tmp/tls.key", &server.key).await?;
    write_file(guest, "/tmp/kubevirt-ca.crt", kubevirt_ca).await?;
    write_file(guest, "/tmp/who.sh", "#!/bin/sh\necho \"$SOCAT_OPENSSL_X509_COMMONNAME\"\nexec cat").await?;
    guest
        .run_ok(&format!(
            "chmod +x /tmp/who.sh\n\
             setsid socat -d -d OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,cert=/tmp/tls.crt,key=/tmp/tls.key,\
             cafile=/tmp/kubevirt-ca.crt,verify=1,openssl-min-proto-version=TLS1.3 EXEC:/tmp/who.sh \
             </dev/null >/tmp/tls.log 2>&1 &\n\
             setsid socat VSOCK-LISTEN:{port},reuseaddr,fork TCP:127.0.0.1:{port} </dev/null >/dev/null 2>&1 &\n\
             for i in $(seq 100); do grep -q listening /tmp/tls.log && break; usleep 100000; done\n\
             grep listening /tmp/tls.log"
        ))
        .await
        .context("the guest's TLS service did not listen (OpenSSL takes a second to start under TCG)")?;
    guest.vsock_connect(port, WAIT).await.map(drop)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_vsock_subresource_reaches_the_guest_through_the_api_server() -> Result<()> {
    let guest = Guest::boot_with_options(&without_network()).await?;
    let cluster = Cluster::start(&[API_SERVER, CONTROLLER, HANDLER]).await?;
    let kubevirt = KubeVirtLab::start_with(&cluster, Some(&guest), NS, vsock_gate()).await?;
    kubevirt.create_vm_with("vm1", true, &vsock_vm(None)).await?;
    let admin = cluster.client(ADMIN).await?;

    // tls=false: the guest's own bytes, through the API server's aggregator, virt-api and virt-handler.
    echo_service(&guest, 5000).await?;
    let mut stream = kubevirt_vsock::open(&admin, NS, "vm1", "port=5000&tls=false").await?.map_err(refused)?;
    let median = median_round_trip(&mut stream).await?;
    eprintln!("vsock echo round trip through the API server's vsock subresource, median of 20: {median:?}");
    drop(stream);

    // tls=true, the default: virt-handler is a TLS 1.3 client presenting KubeVirt's vsock client certificate.
    tls_service(&guest, kubevirt.kubevirt_ca(), 4433).await?;
    let stream = kubevirt_vsock::open(&admin, NS, "vm1", "port=4433").await?.map_err(refused)?;
    let mut stream = tokio::io::BufReader::new(stream);
    let mut line = String::new();
    let read = tokio::time::timeout(WAIT, stream.read_line(&mut line)).await;
    let log = guest.run("cat /tmp/tls.log").await?.output;
    read.context("the guest's TLS service said nothing")??;
    assert_eq!(line.trim(), CLIENT_NAME, "the guest's TLS service saw another client; its log: {log}");
    let mut stream = stream.into_inner();
    stream.write_all(b"over TLS").await?;
    stream.flush().await?;
    let mut echoed = [0u8; 8];
    tokio::time::timeout(WAIT, stream.read_exact(&mut echoed)).await??;
    assert_eq!(&echoed, b"over TLS");
    drop(stream);

    // Another CA's certificate: the guest refuses it, and the stream ends without a byte.
    kubevirt.set_vsock_client_certificate(Some(&foreign_client_certificate()?))?;
    let mut stream = kubevirt_vsock::open(&admin, NS, "vm1", "port=4433").await?.map_err(refused)?;
    assert!(
        read_to_end(&mut stream).await?.is_empty(),
        "a guest that verifies virt-handler took a foreign certificate"
    );
    let log = guest.run_ok("cat /tmp/tls.log").await?;
    assert!(log.contains("certificate verify failed"), "the guest did not refuse the certificate: {log}");
    kubevirt.set_vsock_client_certificate(None)?;

    // KubeVirt's CA at host CID 2, port 1: on the host's side of the guest's device, and from inside the guest.
    let socket = host_port_socket(&guest.vsock_socket(), 1);
    let channel = tonic::transport::Endpoint::from_shared(format!("unix://{}", socket.display()))?.connect().await?;
    let bundle = SystemClient::new(channel).ca_bundle(EmptyRequest {}).await?.into_inner();
    assert_eq!(String::from_utf8(bundle.raw)?, kubevirt.kubevirt_ca());
    // An HTTP/2 client preface to CID 2, port 1: the server's first frame is its SETTINGS (type 4). socat's
    // complaint when `head` has what it needs and closes the pipe ("Broken pipe") is not part of the answer.
    let frame = guest
        .run_ok(
            "printf 'PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n' | socat -t 2 - VSOCK-CONNECT:2:1 2>/dev/null \
             | head -c 9 | od -An -tx1",
        )
        .await?;
    assert_eq!(frame.split_whitespace().nth(3), Some("04"), "not an HTTP/2 SETTINGS frame: {frame}");
    Ok(())
}
