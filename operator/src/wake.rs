//! Which watch events wake a pass: a change of what the pass reads. An object the operator writes itself (a
//! `Wukong`'s status) or that others update in ways it ignores (a claim's annotations as it binds) would otherwise
//! wake a pass per write, each finding nothing to do; at thousands of objects those passes are most of the work.

use futures::{Stream, StreamExt};
use kube::runtime::watcher::{self, Event};
use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

/// The objects of `events` whose part that `read` hashes changed since the last event of the same object (by UID),
/// and every deleted one. The first event of an object (after a start or a re-list) passes.
///
/// Objects are kept by a hash of their UID, not the UID itself: one map per watch holds an entry per object, and at
/// thousands of objects the UIDs' strings were most of its memory. Two UIDs that hash alike only wake a pass too
/// many (the second object's event differs from the first's hash); a missed wake would need the two 64-bit hashes
/// of what is read to collide as well.
pub fn on_change<K, S>(events: S, read: fn(&K, &mut DefaultHasher)) -> impl Stream<Item = Result<K, watcher::Error>>
where
    K: kube::Resource,
    S: Stream<Item = Result<Event<K>, watcher::Error>>,
{
    let mut last: HashMap<u64, u64> = HashMap::new();
    events.filter_map(move |event| {
        let woken = match event {
            Ok(Event::Apply(object) | Event::InitApply(object)) => {
                let mut hasher = DefaultHasher::new();
                read(&object, &mut hasher);
                let hash = hasher.finish();
                (last.insert(uid_key(&object), hash) != Some(hash)).then_some(Ok(object))
            }
            Ok(Event::Delete(object)) => {
                last.remove(&uid_key(&object));
                Some(Ok(object))
            }
            Ok(Event::Init | Event::InitDone) => None,
            Err(e) => Some(Err(e)),
        };
        std::future::ready(woken)
    })
}

/// The key of `object` in [`on_change`]'s map: a hash of its UID.
fn uid_key<K: kube::Resource>(object: &K) -> u64 {
    let mut hasher = DefaultHasher::new();
    object.meta().uid.hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::ResourceExt;

    fn map(uid: &str, data: &str, label: &str) -> ConfigMap {
        serde_json::from_value(serde_json::json!({"metadata": {"name": uid, "uid": uid, "labels": {"l": label}},
                                                  "data": {"d": data}}))
        .unwrap()
    }

    #[tokio::test]
    async fn only_changes_of_what_is_read_and_deletions_wake() {
        let events = vec![
            Event::Init,
            Event::InitApply(map("a", "1", "x")),
            Event::InitDone,
            Event::Apply(map("a", "1", "y")),
            Event::Apply(map("b", "1", "x")),
            Event::Apply(map("a", "2", "y")),
            Event::Apply(map("a", "2", "z")),
            Event::Delete(map("a", "2", "z")),
            Event::Apply(map("a", "2", "z")),
        ];
        let woken: Vec<(String, String)> =
            on_change(futures::stream::iter(events.into_iter().map(Ok)), |m: &ConfigMap, h| m.data.hash(h))
                .map(|m| {
                    let m = m.unwrap();
                    (m.name_any(), m.data.unwrap()["d"].clone())
                })
                .collect()
                .await;
        let expected = [("a", "1"), ("b", "1"), ("a", "2"), ("a", "2"), ("a", "2")];
        assert_eq!(woken, expected.map(|(n, d)| (n.to_string(), d.to_string())));
    }
}
