//! Admission: bounds on requests running at once (overall and per connection) and on open watches, each refused
//! with RESOURCE_EXHAUSTED and a sentence, so one client cannot starve the others.

use crate::config::Limits;
use crate::transport::{ConnectionInfo, Peer};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tonic::{Request, Status};

/// Counts what runs; cheap to clone.
#[derive(Debug, Clone)]
pub struct Admission {
    limits: Limits,
    state: Arc<Mutex<Counts>>,
}

#[derive(Debug, Default)]
struct Counts {
    requests: usize,
    per_connection: HashMap<Peer, usize>,
    watchers: usize,
}

/// A request admitted; released when dropped.
#[derive(Debug)]
pub struct Admitted {
    state: Arc<Mutex<Counts>>,
    connection: Option<Peer>,
    watcher: bool,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut c = self.state.lock().expect("never poisoned");
        if self.watcher {
            c.watchers -= 1;
            return;
        }
        c.requests -= 1;
        if let Some(peer) = &self.connection
            && let Some(n) = c.per_connection.get_mut(peer)
        {
            *n -= 1;
            if *n == 0 {
                c.per_connection.remove(peer);
            }
        }
    }
}

fn busy(message: String) -> Status {
    Status::resource_exhausted(message)
}

impl Admission {
    pub fn new(limits: Limits) -> Self {
        Self { limits, state: Arc::default() }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Admits a request, or says which bound it hit. A connection is told apart by its peer (TCP address, vsock
    /// CID and port); the Unix socket's, which all look alike, count only towards the overall bound.
    pub fn request<T>(&self, req: &Request<T>) -> Result<Admitted, Status> {
        let connection = ConnectionInfo::of(req).map(|info| info.peer.clone()).filter(|peer| *peer != Peer::Local);
        let mut c = self.state.lock().expect("never poisoned");
        if c.requests >= self.limits.max_requests {
            return Err(busy(format!(
                "the agent is busy: {} requests are running, the most it takes at once; retry shortly",
                c.requests
            )));
        }
        if let Some(peer) = &connection {
            let n = c.per_connection.entry(peer.clone()).or_default();
            if *n >= self.limits.max_requests_per_connection {
                return Err(busy(format!(
                    "this connection has {n} requests running, the most one connection may; wait for some to finish"
                )));
            }
            *n += 1;
        }
        c.requests += 1;
        Ok(Admitted { state: self.state.clone(), connection, watcher: false })
    }

    /// Admits a watch, or says the agent has as many as it takes.
    pub fn watcher(&self) -> Result<Admitted, Status> {
        let mut c = self.state.lock().expect("never poisoned");
        if c.watchers >= self.limits.max_watchers {
            return Err(busy(format!(
                "{} disk watches are open, the most the agent keeps; close one or poll ListDisks",
                c.watchers
            )));
        }
        c.watchers += 1;
        Ok(Admitted { state: self.state.clone(), connection: None, watcher: true })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_enforced_and_released() {
        let limits = Limits { max_requests: 2, max_watchers: 1, ..Limits::default() };
        let admission = Admission::new(limits);
        let req = Request::new(());
        let a = admission.request(&req).unwrap();
        let _b = admission.request(&req).unwrap();
        let e = admission.request(&req).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().starts_with("the agent is busy: 2 requests are running"), "{e:?}");
        drop(a);
        assert!(admission.request(&req).is_ok(), "a finished request frees its place");
        let w = admission.watcher().unwrap();
        assert!(admission.watcher().unwrap_err().message().starts_with("1 disk watches are open"));
        drop(w);
        assert!(admission.watcher().is_ok());
    }

    /// Each vsock connection has its own bound, as each TCP one has; the Unix socket's only the overall one.
    #[test]
    fn vsock_connections_are_bounded_one_by_one() {
        use crate::transport::Auth;
        let admission = Admission::new(Limits { max_requests_per_connection: 1, ..Limits::default() });
        let on = |peer| {
            let mut req = Request::new(());
            req.extensions_mut().insert(ConnectionInfo { peer, auth: Auth::None });
            req
        };
        let first = on(Peer::Vsock { cid: 2, port: 1000 });
        let _running = admission.request(&first).unwrap();
        let e = admission.request(&first).unwrap_err();
        assert!(e.message().starts_with("this connection has 1 requests running"), "{e:?}");
        let _other = admission.request(&on(Peer::Vsock { cid: 2, port: 1001 })).expect("another connection");
        let local = on(Peer::Local);
        let _one = admission.request(&local).unwrap();
        let _two = admission.request(&local).expect("the Unix socket's connections are not told apart");
    }
}
