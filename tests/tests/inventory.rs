//! The agent sees hot-plugged disks by serial, in a real guest.

use anyhow::{Context, Result};
use std::collections::HashSet;
use std::time::{Duration, Instant};
use tonic::Code;
use wukong_controller_client::agent_client::ClientError;
use wukong_e2e::{DiskSpec, Guest};
use wukong_proto::v1::{Disk, DiskEvent, EventKind};

type Events = tonic::Streaming<DiskEvent>;

/// Opens a watch and consumes the snapshot; returns the stream positioned at live events.
async fn live_watch(guest: &Guest) -> Result<Events> {
    let mut stream = guest.agent().watch(Vec::new()).await?;
    loop {
        let e = next_event(&mut stream, Duration::from_secs(30)).await?;
        if e.kind() == EventKind::Synced {
            return Ok(stream);
        }
        assert_eq!(e.kind(), EventKind::Existing, "the snapshot holds only EXISTING events before SYNCED");
    }
}

async fn next_event(stream: &mut Events, timeout: Duration) -> Result<DiskEvent> {
    tokio::time::timeout(timeout, stream.message())
        .await
        .context("no disk event arrived in time")??
        .context("the watch stream ended")
}

/// Waits for the next ADDED (or REMOVED) event, skipping CHANGED ones (partition scans, etc.).
async fn next_of(stream: &mut Events, kind: EventKind) -> Result<Disk> {
    loop {
        let e = next_event(stream, Duration::from_secs(60)).await?;
        if e.kind() == kind {
            return Ok(e.disk.expect("ADDED and REMOVED events carry the disk"));
        }
        assert_eq!(e.kind(), EventKind::Changed, "unexpected event {e:?}");
    }
}

/// Checks in the guest that the by-id link resolves to the reported device node.
async fn assert_link_resolves(guest: &Guest, disk: &Disk) -> Result<()> {
    let link = disk.by_id_links.first().context("disk has a by-id link")?;
    let target = guest.run_ok(&format!("readlink -f {link}")).await?;
    assert_eq!(target.trim(), disk.dev_node, "by-id link {link} points at the reported device");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn hotplugged_disks_are_reported_by_serial() -> Result<()> {
    let guest = Guest::boot().await?;
    let agent = guest.agent();
    let mut events = live_watch(&guest).await?;

    let long_serial = "a-serial-of-twenty-nine-chars";
    let specs = [
        DiskSpec::scsi("plain-0001").with_device_id("vpd83-other-id"),
        DiskSpec::scsi(long_serial).with_device_id("long-dev-id"),
        DiskSpec::scsi("MixedCase-Disk"),
        DiskSpec::virtio("virtio-0001"),
    ];
    for spec in &specs {
        guest.hotplug(spec).await?;
        let added = next_of(&mut events, EventKind::Added).await?;
        assert_eq!(added.serial, spec.serial, "ADDED carries the hypervisor's serial");
        assert!(added.dev_node.starts_with("/dev/"), "{added:?}");
        assert_eq!(added.by_id_links.len(), 1, "{added:?}");
        assert_link_resolves(&guest, &added).await?;

        let waited = agent.wait_for_disk(&spec.serial.to_lowercase(), Duration::from_secs(5)).await?;
        assert_eq!(waited.dev_node, added.dev_node, "WaitForDisk finds it case-insensitively");
        if let Some(id) = &spec.device_id {
            assert_eq!(&added.device_id, id);
            assert!(added.by_id_links[0].ends_with(id), "SCSI by-id link uses VPD 0x83: {:?}", added.by_id_links);
            assert_eq!(agent.get_disk(id, false).await?.serial, spec.serial, "lookup by device id");
        }
    }
    let mixed = agent.get_disk("MIXEDCASE-DISK", false).await?;
    assert_eq!(mixed.serial, "MixedCase-Disk");
    let virtio = agent.get_disk("virtio-0001", false).await?;
    assert_eq!(virtio.bus(), wukong_proto::v1::Bus::VirtioBlk);
    assert!(virtio.by_id_links[0].ends_with("virtio-virtio-0001"), "{:?}", virtio.by_id_links);
    assert_eq!(agent.list_disks(false).await?.len(), 4);

    let not_found = agent.get_disk("no-such-disk", false).await.unwrap_err();
    assert_eq!(not_found.code(), Some(Code::NotFound), "{not_found}");
    assert!(not_found.to_string().contains("no-such-disk"), "{not_found}");
    for bad in ["../../etc/passwd", "a b", "x\u{0}y", &"s".repeat(10_000)] {
        let err = agent.get_disk(bad, false).await.unwrap_err();
        assert_eq!(err.code(), Some(Code::InvalidArgument), "{bad:?}: {err}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn wait_for_disk_waits_for_late_disks_and_times_out() -> Result<()> {
    let guest = Guest::boot().await?;
    let agent = guest.agent();

    let started = Instant::now();
    let waiter = tokio::spawn({
        let agent = agent.clone();
        async move { agent.wait_for_disk("late-disk", Duration::from_secs(30)).await }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!waiter.is_finished(), "WaitForDisk returned before the disk existed");
    guest.hotplug(&DiskSpec::scsi("late-disk")).await?;
    let disk = waiter.await??;
    assert_eq!(disk.serial, "late-disk");
    assert!(started.elapsed() >= Duration::from_secs(2));

    let started = Instant::now();
    let err = agent.wait_for_disk("never-arrives", Duration::from_secs(3)).await.unwrap_err();
    let waited = started.elapsed();
    assert_eq!(err.code(), Some(Code::DeadlineExceeded), "{err}");
    assert!(err.to_string().contains("never-arrives"), "{err}");
    assert!(waited >= Duration::from_secs(3) && waited < Duration::from_secs(8), "waited {waited:?}");

    let too_long = agent.wait_for_disk("x", Duration::from_secs(3600)).await.unwrap_err();
    assert_eq!(too_long.code(), Some(Code::InvalidArgument), "{too_long}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn unplug_is_removed_and_a_restarted_agent_lists_exactly_what_is_present() -> Result<()> {
    let guest = Guest::boot().await?;
    let mut events = live_watch(&guest).await?;
    let keep = guest.hotplug(&DiskSpec::scsi("keep-me")).await?;
    next_of(&mut events, EventKind::Added).await?;
    let gone = guest.hotplug(&DiskSpec::scsi("unplug-me")).await?;
    next_of(&mut events, EventKind::Added).await?;

    guest.unplug(&gone).await?;
    let removed = next_of(&mut events, EventKind::Removed).await?;
    assert_eq!(removed.serial, "unplug-me");
    let err = guest.agent().get_disk("unplug-me", false).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound));

    guest.restart_agent().await?;
    let listed: Vec<String> = guest.agent().list_disks(false).await?.into_iter().map(|d| d.serial).collect();
    assert_eq!(listed, vec![keep.spec.serial.clone()]);
    // The guest's own view agrees: exactly one SCSI disk link.
    let links = guest.run_ok("ls /dev/disk/by-id/").await?;
    assert_eq!(links.split_whitespace().collect::<Vec<_>>(), vec!["scsi-0QEMU_QEMU_HARDDISK_keep-me"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_disks_back_to_back_give_twenty_added_events() -> Result<()> {
    let guest = Guest::boot().await?;
    let mut events = live_watch(&guest).await?;
    let serials: Vec<String> = (0..20).map(|i| format!("burst-{i:02}")).collect();
    for s in &serials {
        guest.hotplug(&DiskSpec::scsi(s)).await?;
    }
    let mut added = Vec::new();
    while added.len() < serials.len() {
        added.push(next_of(&mut events, EventKind::Added).await?.serial);
    }
    // Anything after the twentieth must not be another ADDED (a duplicate).
    let quiet_until = Instant::now() + Duration::from_secs(3);
    while let Ok(Ok(Some(e))) = tokio::time::timeout_at(quiet_until.into(), events.message()).await {
        assert_ne!(e.kind(), EventKind::Added, "duplicate ADDED: {e:?}");
    }
    let unique: HashSet<&String> = added.iter().collect();
    assert_eq!(unique.len(), 20, "no duplicates: {added:?}");
    assert_eq!(unique, serials.iter().collect::<HashSet<_>>(), "none lost");
    assert_eq!(guest.agent().list_disks(false).await?.len(), 20);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_in_the_guest_refuses_unknown_and_serves_health_and_info() -> Result<()> {
    let guest = Guest::boot().await?;
    let info = guest.agent().agent_info().await?;
    assert_eq!(info.version, env!("CARGO_PKG_VERSION"));
    assert!(info.kernel_release.contains("cloud-amd64"), "{info:?}");
    assert_eq!(info.boot_id.len(), 36);
    let err = guest.agent().get_disk("", false).await.unwrap_err();
    assert!(matches!(err, ClientError::Agent { .. }) && err.code() == Some(Code::InvalidArgument), "{err}");
    // Standard health and reflection, as grpcurl uses them.
    let channel = tonic::transport::Endpoint::from_shared(guest.agent_address().to_string())?.connect().await?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest { service: "wukong.agent.v1.DiskAgent".into() })
        .await?
        .into_inner();
    assert_eq!(status.status(), tonic_health::pb::health_check_response::ServingStatus::Serving);
    let services = reflected_services(channel).await?;
    assert!(services.contains(&"wukong.agent.v1.DiskAgent".to_string()), "{services:?}");
    assert!(services.contains(&"grpc.health.v1.Health".to_string()), "{services:?}");
    // The local Unix socket exists and is root-only.
    let mode = guest.run_ok("stat -c %a /run/wukong-agent/agent.sock").await?;
    assert_eq!(mode.trim(), "600");
    Ok(())
}

async fn reflected_services(channel: tonic::transport::Channel) -> Result<Vec<String>> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut client = ServerReflectionClient::new(channel);
    let mut responses = client.server_reflection_info(tokio_stream::once(request)).await?.into_inner();
    let response = responses.message().await?.context("reflection answered nothing")?;
    match response.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => Ok(list.service.into_iter().map(|s| s.name).collect()),
        other => anyhow::bail!("unexpected reflection answer {other:?}"),
    }
}
