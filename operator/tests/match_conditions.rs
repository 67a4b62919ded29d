//! deploy/guard.yaml's `matchConditions`, evaluated as the API server evaluates them (Kubernetes >= 1.28,
//! `k8s.io/apiserver/pkg/admission/plugin/webhook/matchconditions`): the lab's API server is 1.20 and ignores the
//! field, so the expressions themselves are tested here, read from the file that ships, against AdmissionReviews
//! recorded from the lab's genuine API server (`tests/src/bin/record-reviews.rs`, `fixtures/reviews/`).
//!
//! The interpreter is the `cel` crate (cel-rust, the successor of `cel-interpreter` from the same project). It has
//! what the expressions use, with cel-go's meaning: `has()` on maps (false for a missing key; an error when an
//! intermediate of the select is missing), deep equality of lists and maps, the ternary, `&&`/`||`. Where it
//! differs from cel-go it is stricter: `has()` on a null or a scalar is an error here (false in cel-go), and `||`
//! and `&&` only short-circuit left to right (cel-go also absorbs an error on the left). So an expression that
//! never fails here never fails in the API server, which is what matters: a failed condition with failurePolicy
//! Fail refuses the update. Without default features: the expressions need no regex, time or encoding functions.

use cel::{Context, Program, Value as Cel};
use proptest::prelude::*;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use wukong_operator::guard::{Plan, plan, read_review};

const GUARD_YAML: &str = include_str!("../../deploy/guard.yaml");
/// The conditions deploy/guard.yaml ships, by name.
const VM: &str = "vm-changes-volumes-or-disks";
const VMI: &str = "vmi-changes-volumes-or-disks";
const NOT_HANDLER: &str = "not-virt-handler";
/// KubeVirt's components as the API server names them (upstream install, namespace `kubevirt`).
const VIRT_HANDLER: &str = "system:serviceaccount:kubevirt:kubevirt-handler";
const VIRT_CONTROLLER: &str = "system:serviceaccount:kubevirt:kubevirt-controller";
const VIRT_API: &str = "system:serviceaccount:kubevirt:kubevirt-apiserver";

struct Webhook {
    name: String,
    conditions: Vec<(String, Program)>,
}

/// The webhooks of deploy/guard.yaml, each with its conditions compiled.
fn webhooks() -> Vec<Webhook> {
    let documents: Vec<Value> = serde_saphyr::from_multiple(GUARD_YAML).expect("deploy/guard.yaml is YAML");
    let config = documents.iter().find(|d| d["kind"] == "ValidatingWebhookConfiguration").expect("the webhooks");
    let webhooks = config["webhooks"].as_array().expect("a list of webhooks");
    webhooks
        .iter()
        .map(|webhook| {
            let name = webhook["name"].as_str().expect("a webhook name").to_string();
            let conditions =
                webhook["matchConditions"].as_array().unwrap_or_else(|| panic!("{name}: no matchConditions"));
            let conditions = conditions
                .iter()
                .map(|c| {
                    let (condition, expression) = (c["name"].as_str().expect("a name"), c["expression"].as_str());
                    let expression = expression.unwrap_or_else(|| panic!("{condition}: no expression"));
                    let program = Program::compile(expression).unwrap_or_else(|e| panic!("{condition}: {e}"));
                    (condition.to_string(), program)
                })
                .collect();
            Webhook { name, conditions }
        })
        .collect()
}

/// JSON as the API server hands it to CEL: unstructured, so an integral number is an int64, any other a double.
fn cel(json: &Value) -> Cel {
    match json {
        Value::Null => Cel::Null,
        Value::Bool(b) => Cel::Bool(*b),
        Value::Number(n) => n.as_i64().map_or_else(|| Cel::Float(n.as_f64().unwrap_or(f64::NAN)), Cel::Int),
        Value::String(s) => Cel::String(Arc::new(s.clone())),
        Value::Array(items) => Cel::List(Arc::new(items.iter().map(cel).collect())),
        Value::Object(fields) => fields.iter().map(|(k, v)| (k.clone(), cel(v))).collect::<HashMap<_, _>>().into(),
    }
}

/// Each condition's result for a review: `object` and `oldObject` (null when absent), and `request`, the
/// AdmissionRequest without the objects (`CreateAdmissionRequest` leaves them out).
fn evaluate(webhook: &Webhook, review: &Value) -> BTreeMap<String, Result<bool, String>> {
    let request = &review["request"];
    let mut context = Context::default();
    context.add_variable_from_value("object", cel(&request["object"]));
    context.add_variable_from_value("oldObject", cel(&request["oldObject"]));
    let mut attributes = request.as_object().cloned().unwrap_or_default();
    attributes.retain(|key, _| key != "object" && key != "oldObject");
    context.add_variable_from_value("request", cel(&Value::Object(attributes)));
    webhook
        .conditions
        .iter()
        .map(|(name, program)| {
            let result = match program.execute(&context) {
                Ok(Cel::Bool(b)) => Ok(b),
                Ok(other) => Err(format!("not a bool: {other:?}")),
                Err(e) => Err(e.to_string()),
            };
            (name.clone(), result)
        })
        .collect()
}

/// What the API server does with the webhook for a review (`matcher.Match`).
#[derive(Debug, PartialEq, Eq)]
enum Decision {
    Called,
    /// Some condition is false: the webhook is not called (whatever the others gave).
    Skipped,
    /// No condition is false but some failed: failurePolicy Fail refuses the update.
    Refused(String),
}

fn decide(webhook: &Webhook, review: &Value) -> Decision {
    let results = evaluate(webhook, review);
    if results.values().any(|r| r == &Ok(false)) {
        return Decision::Skipped;
    }
    let errors: Vec<String> =
        results.iter().filter_map(|(n, r)| r.as_ref().err().map(|e| format!("{n}: {e}"))).collect();
    if errors.is_empty() { Decision::Called } else { Decision::Refused(errors.join("; ")) }
}

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/reviews/{name}.json", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// What the guard itself would do with a review: `true` when it may have to ask a guest.
fn guard_acts_on(review: &Value) -> bool {
    let request = read_review(&serde_json::to_vec(review).unwrap()).expect("a review the guard reads");
    matches!(plan(&request), Ok(Plan::Release { .. }))
}

#[test]
fn the_shipped_conditions_are_valid_and_the_same_for_both_webhooks() {
    let webhooks = webhooks();
    assert_eq!(webhooks.len(), 2);
    for webhook in &webhooks {
        let names: Vec<&str> = webhook.conditions.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, [VM, VMI, NOT_HANDLER], "{}", webhook.name);
        // The API server's rule for a condition name (a qualified name without a prefix).
        for name in names {
            let inner = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
            assert!(name.chars().all(inner) && name.starts_with(|c: char| c.is_ascii_alphanumeric()), "{name}");
            assert!(name.ends_with(|c: char| c.is_ascii_alphanumeric()) && name.len() <= 63, "{name}");
        }
    }
    // One set of conditions (the chart's template wukong.matchConditions, rendered into both), never two that drifted.
    let documents: Vec<Value> = serde_saphyr::from_multiple(GUARD_YAML).expect("deploy/guard.yaml is YAML");
    let config = documents.iter().find(|d| d["kind"] == "ValidatingWebhookConfiguration").expect("the webhooks");
    assert_eq!(config["webhooks"][0]["matchConditions"], config["webhooks"][1]["matchConditions"]);
}

/// Each recorded review and what deploy/guard.yaml's conditions give for it: (vm, vmi, not-virt-handler).
const RECORDED: &[(&str, [bool; 3])] = &[
    // KubeVirt's status and metadata writes change no volume and no disk: the webhook is not called.
    ("vmi-status-by-virt-handler", [true, false, false]),
    ("bare-vmi-status-by-virt-handler", [true, false, false]),
    ("vmi-metadata-by-virt-controller", [true, false, true]),
    ("vm-labels-by-user", [false, true, true]),
    ("bare-vm-labels-by-user", [false, true, true]),
    // Every change to a volume or a disk reaches it, whoever makes it.
    ("vm-volume-removed-by-user", [true, true, true]),
    ("vm-disk-removed-by-user", [true, true, true]),
    ("vm-claim-changed-by-user", [true, true, true]),
    ("vm-volume-added-by-user", [true, true, true]),
    ("vm-volume-removed-by-virt-api", [true, true, true]),
    ("vmi-volume-removed-by-virt-controller", [true, true, true]),
];

#[test]
fn recorded_updates_reach_the_webhook_only_when_they_change_a_volume_or_a_disk() {
    for webhook in webhooks() {
        for (name, [vm, vmi, not_handler]) in RECORDED {
            let review = fixture(name);
            let expected =
                BTreeMap::from([(VM.into(), Ok(*vm)), (VMI.into(), Ok(*vmi)), (NOT_HANDLER.into(), Ok(*not_handler))]);
            assert_eq!(evaluate(&webhook, &review), expected, "{}: {name}", webhook.name);
            let called = vm & vmi & not_handler;
            let decision = decide(&webhook, &review);
            assert_eq!(decision, if called { Decision::Called } else { Decision::Skipped }, "{name}");
            // Nothing the guard would act on is kept from it.
            assert!(called || !guard_acts_on(&review), "{name}: skipped, but the guard would ask the guest");
        }
    }
}

#[test]
fn the_recordings_are_what_they_claim_to_be() {
    // The identities the API server vouched for, and the removals the guard itself sees in them.
    let user = |name: &str| fixture(name)["request"]["userInfo"]["username"].as_str().unwrap().to_string();
    assert_eq!(user("vmi-status-by-virt-handler"), VIRT_HANDLER);
    assert_eq!(user("vmi-metadata-by-virt-controller"), VIRT_CONTROLLER);
    assert_eq!(user("vmi-volume-removed-by-virt-controller"), VIRT_CONTROLLER);
    assert_eq!(user("vm-volume-removed-by-virt-api"), VIRT_API);
    let unplugs =
        ["vm-volume-removed-by-user", "vm-volume-removed-by-virt-api", "vmi-volume-removed-by-virt-controller"];
    for name in unplugs {
        assert!(guard_acts_on(&fixture(name)), "{name}");
    }
    // A VM's template that keeps a volume but drops its disk: KubeVirt admits it and keeps the VMI's disk while
    // its volume stays (`filterHotplugVMIDisks`), so nothing unplugs and the guard asks no guest. The webhook is
    // still called (the disks changed).
    assert!(!guard_acts_on(&fixture("vm-disk-removed-by-user")));
    let claim = |object: &str| {
        let review = fixture("vm-claim-changed-by-user");
        review["request"][object]["spec"]["template"]["spec"]["volumes"][1]["persistentVolumeClaim"]["claimName"]
            .clone()
    };
    assert_eq!((claim("oldObject"), claim("object")), (json!("pvc-data"), json!("pvc-other")));
    let status = fixture("vmi-status-by-virt-handler");
    let (old, new) = (&status["request"]["oldObject"], &status["request"]["object"]);
    assert_ne!(old["status"], new["status"], "a status write");
    assert_eq!(old["spec"], new["spec"]);
    let bare = fixture("bare-vm-labels-by-user");
    let template = &bare["request"]["object"]["spec"]["template"]["spec"];
    assert!(template.get("volumes").is_none() && template["domain"]["devices"].get("disks").is_none());
}

/// `review` with `edit` applied to both its objects.
fn edited(review: &Value, edit: impl Fn(&mut Value)) -> Value {
    let mut review = review.clone();
    edit(&mut review["request"]["object"]);
    edit(&mut review["request"]["oldObject"]);
    review
}

fn remove(value: &mut Value, path: &[&str]) {
    let (last, parents) = path.split_last().unwrap();
    let parent = parents.iter().fold(value, |v, k| &mut v[*k]);
    parent.as_object_mut().unwrap().remove(*last);
}

#[test]
fn missing_parts_and_null_lists_never_fail_a_condition() {
    let (vm, vmi) = (fixture("vm-labels-by-user"), fixture("vmi-status-by-virt-handler"));
    let removed = fixture("vm-volume-removed-by-user");
    let skipped = [
        // No template, no template spec, no domain, no devices; a VMI with no spec at all.
        edited(&vm, |o| remove(o, &["spec", "template"])),
        edited(&vm, |o| remove(o, &["spec", "template", "spec"])),
        edited(&vm, |o| remove(o, &["spec", "template", "spec", "domain"])),
        edited(&vm, |o| remove(o, &["spec", "template", "spec", "domain", "devices"])),
        edited(&vm, |o| remove(o, &["spec"])),
        edited(&vmi, |o| remove(o, &["spec"])),
        edited(&vmi, |o| remove(o, &["spec", "domain"])),
        // Null lists on both sides.
        edited(&vm, |o| o["spec"]["template"]["spec"]["volumes"] = Value::Null),
        edited(&vmi, |o| o["spec"]["domain"]["devices"]["disks"] = Value::Null),
        // No username (the API server leaves an empty one out).
        {
            let mut anonymous = vmi.clone();
            remove(&mut anonymous, &["request", "userInfo", "username"]);
            anonymous
        },
    ];
    for webhook in webhooks() {
        for review in &skipped {
            assert!(evaluate(&webhook, review).values().all(Result::is_ok), "{}: {review:#}", webhook.name);
            assert_eq!(decide(&webhook, review), Decision::Skipped);
        }
        // A list that becomes null or goes missing is a change: the webhook is asked.
        let mut nulled = removed.clone();
        nulled["request"]["object"]["spec"]["template"]["spec"]["volumes"] = Value::Null;
        assert_eq!(decide(&webhook, &nulled), Decision::Called);
        let mut gone = removed.clone();
        remove(&mut gone["request"]["object"], &["spec", "template", "spec", "domain", "devices", "disks"]);
        assert_eq!(decide(&webhook, &gone), Decision::Called);
    }
}

/// A volume or a disk drawn from a small pool, so that random old and new lists are often equal and often not.
fn volume() -> impl Strategy<Value = Value> {
    (0..3usize, 0..2usize, any::<bool>()).prop_map(|(n, claim, hotpluggable)| {
        let (name, claim) = (["a", "b", "c"][n], ["pvc-x", "pvc-y"][claim]);
        json!({"name": name, "persistentVolumeClaim": {"claimName": claim, "hotpluggable": hotpluggable}})
    })
}

fn disk() -> impl Strategy<Value = Value> {
    (0..3usize, any::<bool>()).prop_map(|(n, serial)| {
        let name = ["a", "b", "c"][n];
        if serial { json!({"name": name, "serial": name, "disk": {"bus": "scsi"}}) } else { json!({"name": name}) }
    })
}

/// A list field: absent, null, or a list.
fn slot(item: impl Strategy<Value = Value>) -> impl Strategy<Value = Option<Value>> {
    prop_oneof![Just(None), Just(Some(Value::Null)), proptest::collection::vec(item, 0..3).prop_map(|l| Some(l.into()))]
}

/// A VMI spec (or a VM template's), with or without volumes, a domain, its devices and their disks.
fn spec() -> impl Strategy<Value = Value> {
    (slot(volume()), 0..3u8, slot(disk())).prop_map(|(volumes, depth, disks)| {
        let mut spec = json!({});
        if let Some(volumes) = volumes {
            spec["volumes"] = volumes;
        }
        if depth >= 1 {
            spec["domain"] = json!({"memory": {"guest": "512Mi"}});
        }
        if depth >= 2 {
            spec["domain"]["devices"] = json!({});
            if let Some(disks) = disks {
                spec["domain"]["devices"]["disks"] = disks;
            }
        }
        spec
    })
}

/// Where a kind keeps the spec with its volumes and disks.
fn base(vm: bool) -> &'static [&'static str] {
    if vm { &["spec", "template", "spec"] } else { &["spec"] }
}

fn paths(vm: bool) -> [Vec<&'static str>; 2] {
    [[base(vm), &["volumes"]].concat(), [base(vm), &["domain", "devices", "disks"]].concat()]
}

/// The value at `path`; a missing one (or a missing parent) reads as an empty list, as the conditions read it.
fn list_at(object: &Value, path: &[&str]) -> Value {
    path.iter().try_fold(object, |v, k| v.get(*k)).cloned().unwrap_or_else(|| json!([]))
}

/// Replaces the spec of a recorded object by `spec`, then cuts the path to it after `kept` of its parts (a VM:
/// none, `spec`, `spec.template`, all; a VMI: none, all).
fn with_spec(object: &mut Value, vm: bool, spec: Value, kept: usize) {
    *base(vm).iter().fold(&mut *object, |v, k| &mut v[*k]) = spec;
    if kept < base(vm).len() {
        remove(object, &base(vm)[..=kept]);
    }
}

proptest! {
    /// Random specs in recorded reviews of either kind, by KubeVirt's components or a user: no condition ever
    /// fails, the webhook is called exactly for a change of the volumes or disks (virt-handler aside), and
    /// nothing the guard would act on is kept from it.
    #[test]
    fn any_spec_is_decided_without_failing(
        vm in any::<bool>(),
        user in 0..4usize,
        (old, old_kept) in (spec(), 0..4usize),
        same in any::<bool>(),
        (new, new_kept) in (spec(), 0..4usize),
    ) {
        let mut review = fixture(if vm { "vm-labels-by-user" } else { "vmi-status-by-virt-handler" });
        let user = [VIRT_HANDLER, VIRT_CONTROLLER, VIRT_API, "alice"][user];
        review["request"]["userInfo"]["username"] = user.into();
        let (new, new_kept) = if same { (old.clone(), old_kept) } else { (new, new_kept) };
        with_spec(&mut review["request"]["oldObject"], vm, old, old_kept);
        with_spec(&mut review["request"]["object"], vm, new, new_kept);
        let request = &review["request"];
        let changed = paths(vm).iter().any(|p| list_at(&request["oldObject"], p) != list_at(&request["object"], p));
        for webhook in webhooks() {
            let results = evaluate(&webhook, &review);
            prop_assert!(results.values().all(Result::is_ok), "{results:?}");
            let called = decide(&webhook, &review) == Decision::Called;
            prop_assert_eq!(called, changed && user != VIRT_HANDLER);
        }
        // KubeVirt's admission refuses a hot-plugged volume without a disk of its name; the guard counts such a
        // volume as unplugged even when nothing changed, so only specs KubeVirt stores are checked against it.
        let names = |path: &[&str]| -> Vec<String> {
            let list = list_at(&request["oldObject"], path);
            list.as_array().into_iter().flatten().filter_map(|v| v["name"].as_str().map(str::to_string)).collect()
        };
        let [volumes, disks] = paths(vm);
        let stored = names(&volumes).iter().all(|v| names(&disks).contains(v));
        prop_assert!(changed || !stored || !guard_acts_on(&review));
    }
}
