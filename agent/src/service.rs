//! The `wukong.agent.v1.DiskAgent` gRPC service: validates requests, answers from the inventory, maps errors to
//! status codes with sentences a person can act on.

use crate::access::{Caller, authorize, may_change};
use crate::agent_info::AgentFacts;
use crate::config::Access;
use crate::inventory::{Event, InventoryHandle, LookupError, Snapshot, disk_matches};
use crate::limits::{Admission, Admitted};
use crate::release::{Deadline, ReleaseError, Releaser};
use crate::serial::Serial;
use crate::usage::{UsageError, UsageScanner};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use wukong_proto::v1::disk_agent_server::DiskAgent;
use wukong_proto::v1::{
    AgentInfo, CancelDetachRequest, CancelDetachResponse, CheckUsageRequest, Disk, DiskEvent, EventKind,
    GetAgentInfoRequest, GetDiskRequest, ListDisksRequest, ListDisksResponse, PrepareDetachRequest,
    PrepareDetachResponse, UsageReport, WaitForDiskRequest, WatchDisksRequest,
};

/// `WaitForDisk` timeout when the request gives none.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(60);
/// Longest `WaitForDisk` the agent accepts; a client wanting longer calls again.
pub const MAX_WAIT: Duration = Duration::from_secs(600);
/// Events buffered per watcher before the watcher is treated as lagging and re-sent a snapshot.
const WATCH_BUFFER: usize = 256;
/// Most serials one watch may filter on.
const MAX_WATCH_SERIALS: usize = 1024;

/// The service, cheap to clone.
#[derive(Clone)]
pub struct DiskAgentService {
    inventory: InventoryHandle,
    facts: Arc<AgentFacts>,
    usage: UsageScanner,
    releaser: Releaser,
    access: Access,
    admission: Admission,
    /// Becomes true when the agent shuts down: long-running calls (watches, waits) end at once, so the server's
    /// graceful shutdown does not wait on them.
    stopping: watch::Receiver<bool>,
}

impl DiskAgentService {
    pub fn new(
        inventory: InventoryHandle,
        facts: Arc<AgentFacts>,
        usage: UsageScanner,
        releaser: Releaser,
        access: Access,
        admission: Admission,
        stopping: watch::Receiver<bool>,
    ) -> Self {
        Self { inventory, facts, usage, releaser, access, admission, stopping }
    }

    /// The disk a request names: by serial, or by a path in the guest (a device, a by-id link, a mount point),
    /// resolved to that disk's serial.
    fn named(&self, name: &str) -> Result<Serial, Status> {
        if !crate::locate::is_path(name) {
            return parse_serial(name);
        }
        let snapshot = self.inventory.snapshot();
        let disk = crate::locate::disk_for_path(self.usage.roots(), &snapshot, name)
            .map_err(|e| Status::not_found(e.to_string()))?;
        parse_serial(&disk.id)
    }

    /// Attaches a fresh usage report to each disk.
    async fn with_usage(&self, mut disks: Vec<Disk>) -> Result<Vec<Disk>, Status> {
        let reports = self.usage.check(&disks).await.map_err(usage_status)?;
        for (disk, report) in disks.iter_mut().zip(reports.iter()) {
            disk.usage = Some(report.clone());
        }
        Ok(disks)
    }
}

fn usage_status(e: UsageError) -> Status {
    match e {
        UsageError::Deadline(_) => Status::deadline_exceeded(e.to_string()),
        UsageError::Internal(_) => Status::internal(e.to_string()),
    }
}

/// A refused release carries, as status details, a `PrepareDetachResponse` with the full usage report: a client
/// gets every blocker as data, not only as the sentence.
fn release_status(e: ReleaseError, dry_run: bool) -> Status {
    use prost::Message;
    match e {
        ReleaseError::Lookup(e) => lookup_status(e),
        ReleaseError::Usage(e) => usage_status(e),
        ReleaseError::System { .. } => Status::failed_precondition(e.to_string()),
        ReleaseError::Busy(_) => Status::aborted(e.to_string()),
        ReleaseError::InUse { message, report, disk } => {
            let details = PrepareDetachResponse {
                released: false,
                dry_run,
                disk: Some(*disk),
                actions: Vec::new(),
                usage: Some(*report),
            };
            Status::with_details(tonic::Code::FailedPrecondition, message, details.encode_to_vec().into())
        }
        ReleaseError::Failed { .. } => Status::internal(e.to_string()),
        ReleaseError::Gone { .. } => Status::not_found(e.to_string()),
        ReleaseError::Timeout(_) | ReleaseError::DeadlineExceeded { .. } => Status::deadline_exceeded(e.to_string()),
    }
}

fn shutting_down() -> Status {
    Status::unavailable("the agent is shutting down; retry against the restarted agent")
}

/// Completes when the agent starts shutting down.
async fn stopped(mut stopping: watch::Receiver<bool>) {
    // An error means the sender is gone, which only happens at shutdown too.
    let _ = stopping.wait_for(|s| *s).await;
}

/// Parses a request's serial, or says what is wrong with it.
fn parse_serial(raw: &str) -> Result<Serial, Status> {
    Serial::parse(raw).map_err(|e| Status::invalid_argument(e.to_string()))
}

fn lookup_status(e: LookupError) -> Status {
    match e {
        LookupError::NotFound(_) => Status::not_found(e.to_string()),
        LookupError::Ambiguous { .. } => Status::failed_precondition(e.to_string()),
    }
}

fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    t.into()
}

fn to_proto(e: &Event) -> DiskEvent {
    DiskEvent { kind: e.kind as i32, disk: Some(e.disk.clone()), sequence: e.sequence, time: Some(timestamp(e.time)) }
}

/// Reads the timeout of a `WaitForDisk`: absent → default, negative or beyond the maximum → error.
fn wait_timeout(requested: Option<prost_types::Duration>) -> Result<Duration, Status> {
    let Some(d) = requested else { return Ok(DEFAULT_WAIT) };
    let d = Duration::try_from(d).map_err(|_| Status::invalid_argument("the timeout must not be negative"))?;
    if d > MAX_WAIT {
        return Err(Status::invalid_argument(format!(
            "the timeout of {}s exceeds the maximum of {}s; wait in several calls",
            d.as_secs(),
            MAX_WAIT.as_secs()
        )));
    }
    Ok(d)
}

/// The deadline of a release: the request's or the call's own (its grpc-timeout header), whichever is shorter; none
/// without either. A deadline that is not positive is refused.
fn release_deadline(
    requested: Option<prost_types::Duration>,
    metadata: &tonic::metadata::MetadataMap,
) -> Result<Option<Deadline>, Status> {
    let requested = match requested {
        None => None,
        Some(d) => match Duration::try_from(d) {
            Ok(d) if !d.is_zero() => Some(d),
            _ => return Err(Status::invalid_argument("the deadline must be positive; leave it unset for no limit")),
        },
    };
    let call = metadata.get("grpc-timeout").and_then(|v| v.to_str().ok()).and_then(grpc_timeout);
    Ok(requested.into_iter().chain(call).min().and_then(Deadline::after))
}

/// Parses a grpc-timeout header value: at most 8 digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`).
fn grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at_checked(value.len().checked_sub(1)?)?;
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

type EventStream = Pin<Box<dyn Stream<Item = Result<DiskEvent, Status>> + Send>>;

#[tonic::async_trait]
impl DiskAgent for DiskAgentService {
    async fn get_agent_info(&self, req: Request<GetAgentInfoRequest>) -> Result<Response<AgentInfo>, Status> {
        let _admitted = self.admission.request(&req)?;
        let mut info = self.facts.info();
        info.read_only = may_change(&self.access, &Caller::of(&req)).is_err();
        info.disk_count = self.inventory.snapshot().disks.len() as u32;
        Ok(Response::new(info))
    }

    async fn list_disks(&self, req: Request<ListDisksRequest>) -> Result<Response<ListDisksResponse>, Status> {
        let _admitted = self.admission.request(&req)?;
        let snap = self.inventory.snapshot();
        let mut disks: Vec<Disk> = snap.disks_by_id().into_iter().cloned().collect();
        if req.get_ref().include_usage {
            disks = self.with_usage(disks).await?;
        }
        Ok(Response::new(ListDisksResponse { disks }))
    }

    async fn get_disk(&self, req: Request<GetDiskRequest>) -> Result<Response<Disk>, Status> {
        let _admitted = self.admission.request(&req)?;
        let serial = self.named(&req.get_ref().serial)?;
        let disk = self.inventory.snapshot().find(&serial).map_err(lookup_status)?.clone();
        if req.get_ref().include_usage {
            let mut with = self.with_usage(vec![disk]).await?;
            return Ok(Response::new(with.remove(0)));
        }
        Ok(Response::new(disk))
    }

    type WatchDisksStream = EventStream;

    async fn watch_disks(&self, req: Request<WatchDisksRequest>) -> Result<Response<EventStream>, Status> {
        let filter = &req.get_ref().serials;
        if filter.len() > MAX_WATCH_SERIALS {
            return Err(Status::invalid_argument(format!(
                "a watch may filter on at most {MAX_WATCH_SERIALS} serials; {} were given",
                filter.len()
            )));
        }
        let filter = filter.iter().map(|s| parse_serial(s)).collect::<Result<Vec<_>, _>>()?;
        let admitted = self.admission.watcher()?;
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let longest = Duration::from_secs(self.admission.limits().max_watch_seconds);
        let watch = forward_events(self.inventory.clone(), filter, tx.clone(), self.stopping.clone());
        tokio::spawn(async move {
            let _admitted: Admitted = admitted;
            if tokio::time::timeout(longest, watch).await.is_err() {
                let _ = tx
                    .send(Err(Status::deadline_exceeded(format!(
                        "this watch reached the longest the agent keeps one open ({}s); open a new one, which starts \
                         with a fresh snapshot",
                        longest.as_secs()
                    ))))
                    .await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn wait_for_disk(&self, req: Request<WaitForDiskRequest>) -> Result<Response<Disk>, Status> {
        let _admitted = self.admission.request(&req)?;
        let serial = parse_serial(&req.get_ref().serial)?;
        let timeout = wait_timeout(req.get_ref().timeout)?;
        // Subscribe before looking, so a disk that arrives in between is not missed.
        let mut events = self.inventory.subscribe();
        let wait = async {
            loop {
                match self.inventory.snapshot().find_present(&serial) {
                    Ok(d) => return Ok(d.clone()),
                    Err(e @ LookupError::Ambiguous { .. }) => return Err(lookup_status(e)),
                    Err(LookupError::NotFound(_)) => {}
                }
                match events.recv().await {
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return Err(shutting_down()),
                }
            }
        };
        let wait = async {
            tokio::select! {
                result = wait => result,
                () = stopped(self.stopping.clone()) => Err(shutting_down()),
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(result) => result.map(Response::new),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "no disk with serial '{serial}' appeared in the guest within {:.1}s; check that the hypervisor \
                 attached it with this serial",
                timeout.as_secs_f64()
            ))),
        }
    }

    async fn check_usage(&self, req: Request<CheckUsageRequest>) -> Result<Response<UsageReport>, Status> {
        let _admitted = self.admission.request(&req)?;
        let serial = self.named(&req.get_ref().serial)?;
        let disk = self.inventory.snapshot().find(&serial).map_err(lookup_status)?.clone();
        let reports = self.usage.check(std::slice::from_ref(&disk)).await.map_err(usage_status)?;
        Ok(Response::new(reports[0].clone()))
    }

    async fn prepare_detach(
        &self,
        req: Request<PrepareDetachRequest>,
    ) -> Result<Response<PrepareDetachResponse>, Status> {
        let _admitted = self.admission.request(&req)?;
        authorize(&self.access, &req, "PrepareDetach")?;
        let deadline = release_deadline(req.get_ref().deadline, req.metadata())?;
        let PrepareDetachRequest { serial, unmount, dry_run, .. } = req.into_inner();
        let serial = self.named(&serial)?;
        // A release runs to its end even if the caller goes away: stopping half-way would leave the disk
        // half-released. With a deadline, that end is done or undone by then.
        let releaser = self.releaser.clone();
        let released = tokio::spawn(async move { releaser.prepare(&serial, unmount, dry_run, deadline).await })
            .await
            .map_err(|e| Status::internal(format!("the release task failed: {e}")))?;
        released.map(Response::new).map_err(|e| release_status(e, dry_run))
    }

    async fn cancel_detach(&self, req: Request<CancelDetachRequest>) -> Result<Response<CancelDetachResponse>, Status> {
        let _admitted = self.admission.request(&req)?;
        authorize(&self.access, &req, "CancelDetach")?;
        let serial = self.named(&req.get_ref().serial)?;
        let releaser = self.releaser.clone();
        let cancelled = tokio::spawn(async move { releaser.cancel(&serial).await })
            .await
            .map_err(|e| Status::internal(format!("the cancel task failed: {e}")))?;
        cancelled.map(Response::new).map_err(|e| release_status(e, false))
    }
}

/// Sends a snapshot, then live events, to one watcher until it goes away. A watcher that falls behind is sent a
/// fresh snapshot instead of a gap.
async fn forward_events(
    inventory: InventoryHandle,
    filter: Vec<Serial>,
    tx: mpsc::Sender<Result<DiskEvent, Status>>,
    stopping: watch::Receiver<bool>,
) {
    let wanted = |d: &Disk| filter.is_empty() || filter.iter().any(|s| disk_matches(d, s));
    loop {
        let mut events = inventory.subscribe();
        let snap = inventory.snapshot();
        if send_snapshot(&snap, &wanted, &tx).await.is_err() {
            return;
        }
        loop {
            let event = tokio::select! {
                e = events.recv() => e,
                _ = tx.closed() => return,
                () = stopped(stopping.clone()) => {
                    let _ = tx.send(Err(shutting_down())).await;
                    return;
                }
            };
            match event {
                Ok(e) if e.sequence <= snap.sequence || !wanted(&e.disk) => {}
                Ok(e) => {
                    if tx.send(Ok(to_proto(&e))).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "a disk watcher fell behind; sending it a fresh snapshot");
                    break;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }
}

async fn send_snapshot(
    snap: &Snapshot,
    wanted: &impl Fn(&Disk) -> bool,
    tx: &mpsc::Sender<Result<DiskEvent, Status>>,
) -> Result<(), mpsc::error::SendError<Result<DiskEvent, Status>>> {
    let now = Some(timestamp(SystemTime::now()));
    for disk in snap.disks_by_id().into_iter().filter(|d| wanted(d)) {
        let event = DiskEvent {
            kind: EventKind::Existing as i32,
            disk: Some(disk.clone()),
            sequence: snap.sequence,
            time: now,
        };
        tx.send(Ok(event)).await?;
    }
    tx.send(Ok(DiskEvent { kind: EventKind::Synced as i32, disk: None, sequence: snap.sequence, time: now })).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_timeout_defaults_and_bounds() {
        assert_eq!(wait_timeout(None).unwrap(), DEFAULT_WAIT);
        assert_eq!(wait_timeout(Some(prost_types::Duration { seconds: 2, nanos: 0 })).unwrap(), Duration::from_secs(2));
        let neg = wait_timeout(Some(prost_types::Duration { seconds: -1, nanos: 0 })).unwrap_err();
        assert_eq!(neg.code(), tonic::Code::InvalidArgument);
        let long = wait_timeout(Some(prost_types::Duration { seconds: 601, nanos: 0 })).unwrap_err();
        assert_eq!(long.code(), tonic::Code::InvalidArgument);
        assert!(long.message().contains("600s"), "{}", long.message());
    }

    #[test]
    fn release_deadline_is_the_shorter_of_request_and_call() {
        let mut metadata = tonic::metadata::MetadataMap::new();
        let given = |d: Option<Deadline>| d.map(|d| d.given());
        let secs = |s| Some(prost_types::Duration { seconds: s, nanos: 0 });
        assert_eq!(given(release_deadline(None, &metadata).unwrap()), None, "no limit without either");
        assert_eq!(given(release_deadline(secs(20), &metadata).unwrap()), Some(Duration::from_secs(20)));
        metadata.insert("grpc-timeout", "5000m".parse().unwrap());
        assert_eq!(given(release_deadline(secs(20), &metadata).unwrap()), Some(Duration::from_secs(5)));
        assert_eq!(given(release_deadline(secs(2), &metadata).unwrap()), Some(Duration::from_secs(2)));
        assert_eq!(given(release_deadline(None, &metadata).unwrap()), Some(Duration::from_secs(5)));
        for bad in [secs(0), secs(-3)] {
            let e = release_deadline(bad, &metadata).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert_eq!(e.message(), "the deadline must be positive; leave it unset for no limit");
        }
        let far = Some(prost_types::Duration { seconds: i64::MAX, nanos: 0 });
        assert_eq!(given(release_deadline(far, &metadata).unwrap()), Some(Duration::from_secs(5)));
        let none = tonic::metadata::MetadataMap::new();
        assert_eq!(given(release_deadline(far, &none).unwrap()), None, "beyond what the clock holds: no limit");
    }

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        assert_eq!(grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(grpc_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(grpc_timeout("30S"), Some(Duration::from_secs(30)));
        assert_eq!(grpc_timeout("29999m"), Some(Duration::from_millis(29999)));
        assert_eq!(grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(grpc_timeout("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "S", "123456789S", "5s", "-5S", "5", "1.5S", "5é"] {
            assert_eq!(grpc_timeout(bad), None, "{bad}");
        }
    }

    #[test]
    fn bad_serials_are_invalid_argument() {
        for bad in ["", "../x", "a\0b", &"x".repeat(10_000)] {
            assert_eq!(parse_serial(bad).unwrap_err().code(), tonic::Code::InvalidArgument);
        }
    }
}
