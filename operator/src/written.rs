//! The status this replica last wrote per `Wukong`, until the watch's copy has it. Only the operator writes status,
//! so what it wrote last is the truth even while the watch cache still holds an older copy: a disk detached on the
//! last pass must not be seen, and detached, again. Once the watch delivers that status, the cache is the truth
//! again and the copy is let go, so that thousands of objects are not held twice.

use crate::crd::{Wukong, WukongStatus};
use kube::ResourceExt;
use kube::runtime::watcher::Event;
use std::collections::HashMap;
use std::sync::Mutex;

#[derive(Default)]
pub struct Written(Mutex<HashMap<String, WukongStatus>>);

impl Written {
    /// The status written for object `uid` that the watch has not delivered yet.
    pub fn get(&self, uid: &str) -> Option<WukongStatus> {
        self.lock().get(uid).cloned()
    }

    /// Records `status` as being written for object `uid`; returns what was recorded before, for [`Self::restore`].
    pub fn wrote(&self, uid: &str, status: WukongStatus) -> Option<WukongStatus> {
        self.lock().insert(uid.to_string(), status)
    }

    /// Undoes [`Self::wrote`] after a write that failed: `prior` is what it returned.
    pub fn restore(&self, uid: &str, prior: Option<WukongStatus>) {
        let mut written = self.lock();
        match prior {
            Some(status) => written.insert(uid.to_string(), status),
            None => written.remove(uid),
        };
    }

    pub fn forget(&self, uid: &str) {
        self.lock().remove(uid);
    }

    /// An event of the `Wukong` watch, once the watch cache holds it: the status written is let go when the cache
    /// has it (or the object is gone).
    pub fn seen(&self, event: &Event<Wukong>) {
        match event {
            Event::Apply(wukong) | Event::InitApply(wukong) => {
                let uid = wukong.uid().unwrap_or_default();
                let mut written = self.lock();
                if written.get(&uid).is_some_and(|status| wukong.status.as_ref() == Some(status)) {
                    written.remove(&uid);
                }
            }
            Event::Delete(wukong) => self.forget(&wukong.uid().unwrap_or_default()),
            Event::Init | Event::InitDone => {}
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, WukongStatus>> {
        self.0.lock().expect("never poisoned")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::wukong;
    use serde_json::json;

    #[test]
    fn a_written_status_is_let_go_once_the_watch_has_it() {
        let written = Written::default();
        let mut object = wukong(json!([]));
        let uid = object.uid().unwrap();
        let status = WukongStatus { vm_name: "db-vm".into(), ..Default::default() };
        written.wrote(&uid, status.clone());
        written.seen(&Event::Apply(object.clone()));
        assert_eq!(written.get(&uid), Some(status.clone()), "the watch's copy is older: kept");
        object.status = Some(status);
        written.seen(&Event::InitApply(object.clone()));
        assert!(written.is_empty(), "the watch has it: let go");
        written.wrote(&uid, WukongStatus::default());
        written.seen(&Event::Delete(object));
        assert!(written.is_empty(), "the object is gone");
    }

    #[test]
    fn a_failed_write_leaves_what_was_recorded_before() {
        let written = Written::default();
        let first = WukongStatus { vm_name: "db-vm".into(), ..Default::default() };
        let prior = written.wrote("u1", first.clone());
        written.restore("u1", prior);
        assert!(written.is_empty(), "nothing was recorded before");
        written.wrote("u1", first.clone());
        let prior = written.wrote("u1", WukongStatus { attached: 1, ..first.clone() });
        written.restore("u1", prior);
        assert_eq!(written.get("u1"), Some(first));
    }
}
