//! KubeVirt's CRDs for the lab cluster: `virtualmachines.kubevirt.io` and `virtualmachineinstances.kubevirt.io`, so
//! the API server stores, validates and prunes KubeVirt objects as a cluster with KubeVirt installed does. KubeVirt
//! ships no DataVolume CRD: CDI does, and a cluster without CDI has none (the lab's CDI, [`crate::cdi_lab`],
//! installs CDI's own).
//!
//! The VirtualMachine and VirtualMachineInstance schemas are not written by hand: they are generated from KubeVirt
//! v1.9's OpenAPI document (`tests/kubevirt/openapi.json`) into the structural schemas Kubernetes requires, so a
//! field the project reads or writes is checked against KubeVirt's own types, not against our idea of them.

use anyhow::{Context, Result, bail};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Map, Value, json};
use std::time::{Duration, Instant};

/// KubeVirt v1.9's OpenAPI v2 document; its `definitions` are the source of the schemas.
const OPENAPI: &str = include_str!("../kubevirt/openapi.json");
/// How the document's `$ref`s point at its definitions.
const REF_PREFIX: &str = "#/definitions/";
/// Definitions that hold an integer or a string, which the document says its own ways (a list of types; a string
/// with the format `int-or-string`) and a structural schema one way.
const QUANTITY: &str = "k8s.io.apimachinery.pkg.api.resource.Quantity";
const INT_OR_STRING: &str = "k8s.io.apimachinery.pkg.util.intstr.IntOrString";
/// Object metadata, which the API server checks itself.
const OBJECT_META: &str = "k8s.io.apimachinery.pkg.apis.meta.v1.ObjectMeta";
/// The field manager of the lab's server-side applies.
const FIELD_MANAGER: &str = "wukong-lab";
/// A CRD is Established in well under a second (0.14–0.29 s measured); this allows for a loaded machine.
const ESTABLISH_TIMEOUT: Duration = Duration::from_secs(30);

/// The three CRDs, their VirtualMachine and VirtualMachineInstance schemas generated from the vendored document.
pub fn crds() -> Result<Vec<CustomResourceDefinition>> {
    let definitions = Definitions::parse(OPENAPI)?;
    let vm_columns = json!([
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        {"name": "Status", "type": "string", "jsonPath": ".status.printableStatus", "description": "Human Readable Status"},
        {"name": "Ready", "type": "string", "jsonPath": ".status.conditions[?(@.type=='Ready')].status"},
    ]);
    let vmi_columns = json!([
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "IP", "type": "string", "jsonPath": ".status.interfaces[0].ipAddress"},
        {"name": "NodeName", "type": "string", "jsonPath": ".status.nodeName"},
        {"name": "Ready", "type": "string", "jsonPath": ".status.conditions[?(@.type=='Ready')].status"},
    ]);
    Ok(vec![
        crd(
            ("kubevirt.io", "v1"),
            ("VirtualMachine", "virtualmachines", "virtualmachine", &["vm", "vms"]),
            definitions.kind_schema("v1.VirtualMachine")?,
            vm_columns,
            Status::Subresource,
        )?,
        crd(
            ("kubevirt.io", "v1"),
            ("VirtualMachineInstance", "virtualmachineinstances", "virtualmachineinstance", &["vmi", "vmis"]),
            definitions.kind_schema("v1.VirtualMachineInstance")?,
            vmi_columns,
            Status::InTheObject,
        )?,
    ])
}

/// Creates or updates the CRDs (server-side apply) and waits until the API server serves each of them.
pub async fn install(client: &kube::Client) -> Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    // Forced: the lab owns these CRDs, and an apply must win over whatever an earlier run left.
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut names = Vec::new();
    for crd in crds()? {
        let name = crd.metadata.name.clone().context("a KubeVirt CRD has no name")?;
        api.patch(&name, &params, &Patch::Apply(&crd)).await.with_context(|| format!("applying the CRD {name}"))?;
        names.push(name);
    }
    for name in names {
        wait_established(&api, &name).await?;
    }
    Ok(())
}

async fn wait_established(api: &Api<CustomResourceDefinition>, name: &str) -> Result<()> {
    let started = Instant::now();
    loop {
        let crd = api.get(name).await.with_context(|| format!("reading the CRD {name}"))?;
        let conditions = crd.status.and_then(|s| s.conditions).unwrap_or_default();
        if conditions.iter().any(|c| c.type_ == "Established" && c.status == "True") {
            return Ok(());
        }
        if started.elapsed() > ESTABLISH_TIMEOUT {
            let conditions: Vec<String> = conditions
                .iter()
                .map(|c| format!("{}={} ({})", c.type_, c.status, c.message.as_deref().unwrap_or_default()))
                .collect();
            bail!("the CRD {name} was not Established within {ESTABLISH_TIMEOUT:?}; its conditions: {conditions:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Where a kind's status is written.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Status {
    /// Through `/status` (a status subresource): a write of the object leaves the status alone.
    Subresource,
    /// With the object: KubeVirt's VirtualMachineInstance CRD has no status subresource
    /// (pkg/virt-operator/resource/generate/components/crds.go, `NewVirtualMachineInstanceCrd` adds printer columns
    /// only), so every status write by virt-controller and virt-handler is a plain update of the VMI, seen by every
    /// validating webhook on VMI updates.
    InTheObject,
}

fn crd(
    (group, version): (&str, &str),
    (kind, plural, singular, short_names): (&str, &str, &str, &[&str]),
    schema: Value,
    columns: Value,
    status: Status,
) -> Result<CustomResourceDefinition> {
    let mut crd = json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("{plural}.{group}")},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": format!("{kind}List"),
                "plural": plural,
                "singular": singular,
                "shortNames": short_names,
                "categories": ["all"],
            },
            "versions": [{
                "name": version,
                "served": true,
                "storage": true,
                "schema": {"openAPIV3Schema": schema},
                "additionalPrinterColumns": columns,
            }],
        },
    });
    if status == Status::Subresource {
        crd["spec"]["versions"][0]["subresources"] = json!({"status": {}});
    }
    zero_values_allowed(&mut crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]);
    serde_json::from_value(crd).with_context(|| format!("the CRD {plural}.{group} does not fit k8s-openapi's types"))
}

/// Marks every scalar of a schema `nullable`. The lab's API server is built with Go 1.19, where `reflect.Zero` and a
/// zero value stored in an interface point at the same runtime zero buffer, so its go-openapi `typeValidator`, which
/// compares the two with `reflect.DeepEqual`, takes any zero scalar ("", false, 0) for null and refuses it (seen on
/// creates, updates and patches of the object): KubeVirt's `target: ""` of a volume not attached yet could not be
/// stored. With `nullable` zero values pass, as they do in a Kubernetes built with the Go of its day; a value of
/// another type is still refused.
fn zero_values_allowed(schema: &mut Value) {
    let Some(node) = schema.as_object_mut() else { return };
    if matches!(node.get("type").and_then(Value::as_str), Some("string" | "boolean" | "integer" | "number")) {
        node.insert("nullable".into(), true.into());
    }
    if let Some(Value::Object(properties)) = node.get_mut("properties") {
        properties.values_mut().for_each(zero_values_allowed);
    }
    if let Some(values) = node.get_mut("additionalProperties") {
        zero_values_allowed(values);
    }
    // The API server allows no nullable item of a set, nor a nullable key of a list-map.
    let set = node.get("x-kubernetes-list-type").is_some_and(|t| t == "set");
    let keys = node.get("x-kubernetes-list-map-keys").cloned().unwrap_or_default();
    if let Some(items) = node.get_mut("items").filter(|_| !set) {
        zero_values_allowed(items);
        for key in keys.as_array().into_iter().flatten().filter_map(Value::as_str) {
            let key = items.get_mut("properties").and_then(|p| p.get_mut(key)).and_then(Value::as_object_mut);
            key.map(|k| k.remove("nullable"));
        }
    }
}

/// The document's `definitions`, and their conversion into structural schemas
/// (<https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/custom-resource-definitions/#specifying-a-structural-schema>).
struct Definitions(Map<String, Value>);

impl Definitions {
    fn parse(document: &str) -> Result<Self> {
        let mut document: Value =
            serde_json::from_str(document).context("the KubeVirt OpenAPI document is not JSON")?;
        match document.get_mut("definitions").map(Value::take) {
            Some(Value::Object(definitions)) => Ok(Self(definitions)),
            _ => bail!("the KubeVirt OpenAPI document has no definitions object"),
        }
    }

    /// The schema of a kind (a top-level object): the API server validates the object's own metadata itself and
    /// allows nothing but `type: object` for it.
    fn kind_schema(&self, name: &str) -> Result<Value> {
        let mut schema = self.resolve(name, &mut Vec::new(), name)?;
        let properties = schema
            .get_mut("properties")
            .and_then(Value::as_object_mut)
            .with_context(|| format!("the definition {name} has no properties"))?;
        properties.insert("metadata".into(), json!({"type": "object"}));
        Ok(Value::Object(schema))
    }

    /// The structural schema of definition `name`, reached at `path` through the definitions in `stack`.
    fn resolve(&self, name: &str, stack: &mut Vec<String>, path: &str) -> Result<Map<String, Value>> {
        let schema = match name {
            QUANTITY | INT_OR_STRING => int_or_string(),
            // Embedded metadata (a template's, a data volume template's) is not validated by the API server; its
            // full schema would only make the CRD larger.
            OBJECT_META => open_object(),
            // A structural schema is a finite tree: a type within itself keeps whatever it holds.
            _ if stack.iter().any(|s| s == name) => open_object(),
            _ => {
                let definition =
                    self.0.get(name).with_context(|| format!("{path} refers to {name}, which is not defined"))?;
                stack.push(name.to_string());
                let schema = self.convert(definition, stack, path);
                stack.pop();
                return schema;
            }
        };
        Ok(schema)
    }

    /// The structural schema of one node of the document, at `path`.
    fn convert(&self, node: &Value, stack: &mut Vec<String>, path: &str) -> Result<Map<String, Value>> {
        let node = node.as_object().with_context(|| format!("{path}: a schema that is not a JSON object"))?;
        if let Some(reference) = node.get("$ref") {
            if let Some(other) = node.keys().find(|k| !matches!(k.as_str(), "$ref" | "description" | "default")) {
                bail!("{path}: {other} next to a $ref");
            }
            let name = reference
                .as_str()
                .and_then(|r| r.strip_prefix(REF_PREFIX))
                .with_context(|| format!("{path}: the $ref {reference} does not point into {REF_PREFIX}"))?;
            let mut schema = self.resolve(name, stack, path)?;
            // The field's own description says what it means here; the definition's only what the type is.
            if let Some(description) = node.get("description") {
                schema.insert("description".into(), description.clone());
            }
            return Ok(schema);
        }
        let mut schema = Map::new();
        for (key, value) in node {
            match key.as_str() {
                "type" => match value {
                    Value::Array(types) => schema.extend(union_type(types, path)?),
                    _ => {
                        schema.insert(key.clone(), value.clone());
                    }
                },
                // The API server accepts any format and checks those it knows (int32, date-time, byte, …).
                "description"
                | "format"
                | "enum"
                | "nullable"
                | "required"
                | "x-kubernetes-list-type"
                | "x-kubernetes-list-map-keys"
                | "x-kubernetes-map-type" => {
                    schema.insert(key.clone(), value.clone());
                }
                "properties" => {
                    let properties = value.as_object().with_context(|| format!("{path}: properties not an object"))?;
                    let mut converted = Map::new();
                    for (name, property) in properties {
                        converted.insert(
                            name.clone(),
                            Value::Object(self.convert(property, stack, &format!("{path}.{name}"))?),
                        );
                    }
                    schema.insert(key.clone(), Value::Object(converted));
                }
                "items" => {
                    schema.insert(key.clone(), Value::Object(self.convert(value, stack, &format!("{path}[]"))?));
                }
                "additionalProperties" => {
                    schema.insert(key.clone(), Value::Object(self.convert(value, stack, &format!("{path}[*]"))?));
                }
                // KubeVirt defaults in its webhooks, not in its CRDs (and `default: {}` on every struct would make
                // the API server write empty objects KubeVirt never writes); the patch hints are for strategic
                // merge patches, which custom resources do not take.
                "default" | "x-kubernetes-patch-strategy" | "x-kubernetes-patch-merge-key" => {}
                other => bail!("{path}: {other} has no place in a CRD schema"),
            }
        }
        if schema.contains_key("x-kubernetes-int-or-string") {
            return Ok(schema);
        }
        match schema.get("type").and_then(Value::as_str) {
            None => bail!("{path} has no type"),
            Some("object") => match (schema.contains_key("properties"), schema.contains_key("additionalProperties")) {
                (true, true) => bail!("{path} has both properties and additionalProperties"),
                // An object the document leaves open (RawExtension, FieldsV1, empty marker structs).
                (false, false) => {
                    schema.insert("x-kubernetes-preserve-unknown-fields".into(), true.into());
                }
                _ => {}
            },
            Some("array") => Self::check_list(&schema, path)?,
            Some(_) => {}
        }
        Ok(schema)
    }

    /// An array must have items; a list-map's keys must be required in them, as their defaults are dropped.
    fn check_list(schema: &Map<String, Value>, path: &str) -> Result<()> {
        let items = schema.get("items").with_context(|| format!("{path} is an array without items"))?;
        let keys = schema.get("x-kubernetes-list-map-keys").and_then(Value::as_array).into_iter().flatten();
        let required = items.get("required").and_then(Value::as_array);
        for key in keys {
            if !required.is_some_and(|r| r.contains(key)) {
                bail!("{path}: the list-map key {key} is not required in its items");
            }
        }
        Ok(())
    }
}

/// A list of types, which a structural schema cannot have: `null` among them makes the field nullable, and a string
/// that may also be a number is Kubernetes' int-or-string (a port, a quantity).
fn union_type(types: &[Value], path: &str) -> Result<Map<String, Value>> {
    let names: Vec<&str> = types
        .iter()
        .map(|t| t.as_str().with_context(|| format!("{path}: a type that is not a name")))
        .collect::<Result<_>>()?;
    let (nulls, names): (Vec<&str>, Vec<&str>) = names.into_iter().partition(|n| *n == "null");
    let mut schema = Map::new();
    if !nulls.is_empty() {
        schema.insert("nullable".into(), true.into());
    }
    match names[..] {
        [one] => {
            schema.insert("type".into(), one.into());
        }
        _ if names.contains(&"string") && names.iter().all(|n| matches!(*n, "string" | "integer" | "number")) => {
            schema.extend(int_or_string())
        }
        _ => bail!("{path}: the types {names:?} have no structural equivalent"),
    }
    Ok(schema)
}

/// An integer or a string, as Kubernetes' own CRDs say it.
fn int_or_string() -> Map<String, Value> {
    object(json!({"x-kubernetes-int-or-string": true, "anyOf": [{"type": "integer"}, {"type": "string"}]}))
}

/// An object that keeps whatever fields it is given.
fn open_object() -> Map<String, Value> {
    object(json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}))
}

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => unreachable!("only called with JSON objects"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Half the API server's (etcd's) 1.5 MiB limit: room for managedFields and for the document to grow.
    const SIZE_LIMIT: usize = 768 << 10;

    fn definitions(defs: Value) -> Definitions {
        Definitions::parse(&json!({ "definitions": defs }).to_string()).unwrap()
    }

    fn generated() -> Vec<Value> {
        crds().unwrap().iter().map(|crd| serde_json::to_value(crd).unwrap()).collect()
    }

    fn schema_of(crd: &Value) -> &Value {
        &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    }

    /// Walks every schema node (the root, properties, items, map values, anyOf branches) with its path.
    fn walk_schemas<'a>(node: &'a Value, path: String, visit: &mut dyn FnMut(&str, &'a Value)) {
        visit(&path, node);
        if let Some(properties) = node["properties"].as_object() {
            for (name, property) in properties {
                walk_schemas(property, format!("{path}.{name}"), visit);
            }
        }
        if node["items"].is_object() {
            walk_schemas(&node["items"], format!("{path}[]"), visit);
        }
        if node["additionalProperties"].is_object() {
            walk_schemas(&node["additionalProperties"], format!("{path}[*]"), visit);
        }
        for (n, branch) in node["anyOf"].as_array().into_iter().flatten().enumerate() {
            walk_schemas(branch, format!("{path}.anyOf[{n}]"), visit);
        }
    }

    /// Every keyword anywhere in a JSON value, with the path to it (the keys of `properties` are field names, like
    /// multus' `default`, not keywords).
    fn all_keys(value: &Value, path: &str, out: &mut Vec<(String, String)>) {
        match value {
            Value::Object(map) => {
                for (key, value) in map {
                    if !path.ends_with("/properties") {
                        out.push((path.to_string(), key.clone()));
                    }
                    all_keys(value, &format!("{path}/{key}"), out);
                }
            }
            Value::Array(items) => items.iter().enumerate().for_each(|(n, v)| all_keys(v, &format!("{path}/{n}"), out)),
            _ => {}
        }
    }

    #[test]
    fn refs_resolve_to_their_definitions_with_the_fields_own_description() {
        let defs = definitions(json!({
            "v1.Thing": {"type": "object", "description": "a thing", "required": ["disk"], "properties": {
                "disk": {"description": "the thing's disk", "default": {}, "$ref": "#/definitions/v1.Disk"},
                "disks": {"type": "array", "items": {"default": {}, "$ref": "#/definitions/v1.Disk"}},
            }},
            "v1.Disk": {"type": "object", "description": "a disk", "properties": {
                "serial": {"type": "string", "default": ""},
                "size": {"type": "integer", "format": "int64"},
            }},
        }));
        let disk = json!({"type": "object", "properties": {
            "serial": {"type": "string"},
            "size": {"type": "integer", "format": "int64"},
        }});
        let mut described = disk.clone();
        described["description"] = "the thing's disk".into();
        let mut plain = disk;
        plain["description"] = "a disk".into();
        assert_eq!(
            Value::Object(defs.resolve("v1.Thing", &mut Vec::new(), "v1.Thing").unwrap()),
            json!({"type": "object", "description": "a thing", "required": ["disk"], "properties": {
                "disk": described,
                "disks": {"type": "array", "items": plain},
            }})
        );
    }

    #[test]
    fn a_definition_within_itself_is_cut_where_it_recurs() {
        let defs = definitions(json!({
            "v1.Node": {"type": "object", "properties": {
                "name": {"type": "string"},
                "children": {"type": "array", "items": {"$ref": "#/definitions/v1.Node"}},
                "leaf": {"$ref": "#/definitions/v1.Leaf"},
            }},
            "v1.Leaf": {"type": "object", "properties": {
                "back": {"description": "up again", "$ref": "#/definitions/v1.Node"},
            }},
        }));
        let node = Value::Object(defs.resolve("v1.Node", &mut Vec::new(), "v1.Node").unwrap());
        let cut = json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true});
        assert_eq!(node["properties"]["children"]["items"], cut);
        let mut described = cut;
        described["description"] = "up again".into();
        assert_eq!(node["properties"]["leaf"]["properties"]["back"], described);
        assert_eq!(node["properties"]["name"], json!({"type": "string"}));
    }

    #[test]
    fn a_definition_used_twice_side_by_side_is_not_a_recursion() {
        let defs = definitions(json!({
            "v1.Pair": {"type": "object", "properties": {
                "a": {"$ref": "#/definitions/v1.Leaf"},
                "b": {"$ref": "#/definitions/v1.Leaf"},
            }},
            "v1.Leaf": {"type": "object", "properties": {"x": {"type": "string"}}},
        }));
        let pair = Value::Object(defs.resolve("v1.Pair", &mut Vec::new(), "v1.Pair").unwrap());
        let leaf = json!({"type": "object", "properties": {"x": {"type": "string"}}});
        assert_eq!(pair["properties"]["a"], leaf);
        assert_eq!(pair["properties"]["b"], leaf);
    }

    #[test]
    fn quantities_and_int_or_strings_become_int_or_string_and_times_stay_strings() {
        let defs = definitions(json!({
            "v1.R": {"type": "object", "properties": {
                "requests": {"type": "object", "additionalProperties":
                    {"$ref": "#/definitions/k8s.io.apimachinery.pkg.api.resource.Quantity"}},
                "port": {"$ref": "#/definitions/k8s.io.apimachinery.pkg.util.intstr.IntOrString"},
                "at": {"$ref": "#/definitions/k8s.io.apimachinery.pkg.apis.meta.v1.Time"},
            }},
            "k8s.io.apimachinery.pkg.api.resource.Quantity": {"type": ["string", "integer", "number"]},
            "k8s.io.apimachinery.pkg.util.intstr.IntOrString": {"type": "string", "format": "int-or-string"},
            "k8s.io.apimachinery.pkg.apis.meta.v1.Time": {"type": "string", "format": "date-time"},
        }));
        let r = Value::Object(defs.resolve("v1.R", &mut Vec::new(), "v1.R").unwrap());
        let int_or_string =
            json!({"x-kubernetes-int-or-string": true, "anyOf": [{"type": "integer"}, {"type": "string"}]});
        assert_eq!(r["properties"]["requests"], json!({"type": "object", "additionalProperties": int_or_string}));
        assert_eq!(r["properties"]["port"], int_or_string);
        assert_eq!(r["properties"]["at"], json!({"type": "string", "format": "date-time"}));
    }

    #[test]
    fn lists_of_types_become_nullable_or_int_or_string() {
        let defs = definitions(json!({
            "v1.U": {"type": "object", "properties": {
                "port": {"description": "a port", "type": ["string", "number"]},
                "at": {"type": ["string", "null"]},
                "maybe": {"type": ["null", "integer", "string"]},
            }},
        }));
        let u = Value::Object(defs.resolve("v1.U", &mut Vec::new(), "v1.U").unwrap());
        let either = json!([{"type": "integer"}, {"type": "string"}]);
        assert_eq!(
            u["properties"]["port"],
            json!({"description": "a port", "x-kubernetes-int-or-string": true, "anyOf": either})
        );
        assert_eq!(u["properties"]["at"], json!({"type": "string", "nullable": true}));
        assert_eq!(
            u["properties"]["maybe"],
            json!({"nullable": true, "x-kubernetes-int-or-string": true, "anyOf": either})
        );
    }

    #[test]
    fn maps_stay_maps_and_open_objects_keep_unknown_fields() {
        let defs = definitions(json!({
            "v1.M": {"type": "object", "properties": {
                "labels": {"type": "object", "additionalProperties": {"type": "string", "default": ""}},
                "raw": {"$ref": "#/definitions/k8s.io.apimachinery.pkg.runtime.RawExtension"},
                "marker": {"type": "object"},
                "meta": {"$ref": "#/definitions/k8s.io.apimachinery.pkg.apis.meta.v1.ObjectMeta"},
            }},
            "k8s.io.apimachinery.pkg.runtime.RawExtension": {"type": "object", "description": "raw"},
            "k8s.io.apimachinery.pkg.apis.meta.v1.ObjectMeta":
                {"type": "object", "properties": {"name": {"type": "string"}}},
        }));
        let m = Value::Object(defs.resolve("v1.M", &mut Vec::new(), "v1.M").unwrap());
        assert_eq!(m["properties"]["labels"], json!({"type": "object", "additionalProperties": {"type": "string"}}));
        assert_eq!(
            m["properties"]["raw"],
            json!({"type": "object", "description": "raw", "x-kubernetes-preserve-unknown-fields": true})
        );
        assert_eq!(m["properties"]["marker"], json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}));
        assert_eq!(m["properties"]["meta"], json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}));
    }

    #[test]
    fn a_kinds_own_metadata_is_just_an_object() {
        let defs = definitions(json!({
            "v1.Kind": {"type": "object", "properties": {
                "metadata": {"$ref": "#/definitions/k8s.io.apimachinery.pkg.apis.meta.v1.ObjectMeta"},
                "spec": {"type": "object", "properties": {
                    "template": {"type": "object", "properties": {
                        "metadata": {"$ref": "#/definitions/k8s.io.apimachinery.pkg.apis.meta.v1.ObjectMeta"},
                    }},
                }},
            }},
        }));
        let kind = defs.kind_schema("v1.Kind").unwrap();
        assert_eq!(kind["properties"]["metadata"], json!({"type": "object"}));
        assert_eq!(
            kind["properties"]["spec"]["properties"]["template"]["properties"]["metadata"],
            json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true})
        );
    }

    #[test]
    fn what_a_structural_schema_cannot_say_is_refused_with_its_path() {
        let refused = |defs: Value| format!("{:#}", definitions(defs).kind_schema("v1.X").unwrap_err());
        let no_type = refused(json!({"v1.X": {"type": "object", "properties": {"a": {"description": "?"}}}}));
        assert_eq!(no_type, "v1.X.a has no type");
        let dangling =
            refused(json!({"v1.X": {"type": "object", "properties": {"a": {"$ref": "#/definitions/v1.Y"}}}}));
        assert_eq!(dangling, "v1.X.a refers to v1.Y, which is not defined");
        let foreign = refused(json!({"v1.X": {"type": "object", "properties": {"a": {"$ref": "other.json#/Y"}}}}));
        assert_eq!(foreign, "v1.X.a: the $ref \"other.json#/Y\" does not point into #/definitions/");
        let both = refused(json!({"v1.X": {"type": "object", "properties": {"a": {"type": "object",
            "properties": {"b": {"type": "string"}}, "additionalProperties": {"type": "string"}}}}}));
        assert_eq!(both, "v1.X.a has both properties and additionalProperties");
        let unknown =
            refused(json!({"v1.X": {"type": "object", "properties": {"a": {"type": "string", "oneOf": []}}}}));
        assert_eq!(unknown, "v1.X.a: oneOf has no place in a CRD schema");
        let union = refused(json!({"v1.X": {"type": "object", "properties": {"a": {"type": ["object", "string"]}}}}));
        assert_eq!(union, "v1.X.a: the types [\"object\", \"string\"] have no structural equivalent");
        let keyless = refused(json!({"v1.X": {"type": "object", "properties": {"l": {"type": "array",
            "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
            "items": {"type": "object", "properties": {"name": {"type": "string", "default": ""}}}}}}}));
        assert_eq!(keyless, "v1.X.l: the list-map key \"name\" is not required in its items");
    }

    #[test]
    fn the_generated_schemas_are_structural_through_and_through() {
        for crd in generated() {
            let name = crd["metadata"]["name"].as_str().unwrap().to_string();
            walk_schemas(schema_of(&crd), String::new(), &mut |path, node| {
                let int_or_string = node["x-kubernetes-int-or-string"] == true;
                assert!(node["type"].is_string() || int_or_string, "{name}{path} has no type: {node}");
                assert!(!(int_or_string && node.get("type").is_some()), "{name}{path}: int-or-string with a type");
                // The object's own metadata is the API server's to validate: `type: object` and nothing more.
                if node["type"] == "object" && path != ".metadata" {
                    let open = node["x-kubernetes-preserve-unknown-fields"] == true;
                    let fields = node.get("properties").is_some();
                    let map = node.get("additionalProperties").is_some();
                    assert_eq!([open, fields, map].iter().filter(|b| **b).count(), 1, "{name}{path}: {node}");
                }
                if node["type"] == "array" {
                    assert!(node["items"].is_object(), "{name}{path}: an array without items");
                }
            });
            let mut keys = Vec::new();
            all_keys(&crd, "", &mut keys);
            for (path, key) in keys {
                assert!(
                    !matches!(
                        key.as_str(),
                        "$ref" | "default" | "x-kubernetes-patch-strategy" | "x-kubernetes-patch-merge-key"
                    ),
                    "{name}: {key} at {path}"
                );
            }
        }
    }

    #[test]
    fn nothing_is_lost_on_the_way_into_k8s_openapis_types() {
        let defs = Definitions::parse(OPENAPI).unwrap();
        let crds = generated();
        for (crd, kind) in crds.iter().zip(["v1.VirtualMachine", "v1.VirtualMachineInstance"]) {
            let mut expected = defs.kind_schema(kind).unwrap();
            zero_values_allowed(&mut expected);
            assert_eq!(schema_of(crd), &expected, "{kind}");
        }
    }

    #[test]
    fn the_crds_are_named_and_sized_for_the_api_server() {
        let crds = generated();
        let names: Vec<&str> = crds.iter().map(|c| c["metadata"]["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["virtualmachines.kubevirt.io", "virtualmachineinstances.kubevirt.io"]);
        for crd in &crds {
            let size = crd.to_string().len();
            println!("{}: {size} bytes of JSON", crd["metadata"]["name"]);
            assert!(size < SIZE_LIMIT, "{}: {size} bytes", crd["metadata"]["name"]);
            let version = &crd["spec"]["versions"][0];
            assert_eq!((version["served"].as_bool(), version["storage"].as_bool()), (Some(true), Some(true)));
            assert_eq!(crd["spec"]["scope"], "Namespaced");
            assert_eq!(crd["spec"]["names"]["categories"], json!(["all"]));
        }
        // As KubeVirt ships them: the VMI has its status in the object.
        let subresources: Vec<&Value> = crds.iter().map(|c| &c["spec"]["versions"][0]["subresources"]).collect();
        assert_eq!(subresources, [&json!({"status": {}}), &Value::Null]);
        assert_eq!(crds[0]["spec"]["names"]["shortNames"], json!(["vm", "vms"]));
        assert_eq!(crds[1]["spec"]["names"]["shortNames"], json!(["vmi", "vmis"]));
    }

    #[test]
    fn the_fields_the_project_uses_are_typed() {
        let crds = generated();
        let at = |crd: &Value, path: &str| {
            let mut node = schema_of(crd);
            for step in path.split('.') {
                node = if step == "[]" { &node["items"] } else { &node["properties"][step] };
            }
            node["type"].as_str().map(str::to_string).unwrap_or_else(|| panic!("{path}: {node}"))
        };
        let (vm, vmi) = (&crds[0], &crds[1]);
        for (path, kind) in [
            ("spec.running", "boolean"),
            ("spec.runStrategy", "string"),
            ("spec.template.spec.volumes.[].name", "string"),
            ("spec.template.spec.volumes.[].persistentVolumeClaim.claimName", "string"),
            ("spec.template.spec.volumes.[].persistentVolumeClaim.hotpluggable", "boolean"),
            ("spec.template.spec.volumes.[].dataVolume.name", "string"),
            ("spec.template.spec.volumes.[].dataVolume.hotpluggable", "boolean"),
            ("spec.template.spec.domain.devices.disks.[].name", "string"),
            ("spec.template.spec.domain.devices.disks.[].serial", "string"),
            ("spec.template.spec.domain.devices.disks.[].disk.bus", "string"),
            ("spec.dataVolumeTemplates.[].metadata", "object"),
            ("status.printableStatus", "string"),
        ] {
            assert_eq!(at(vm, path), kind, "VirtualMachine {path}");
        }
        for (path, kind) in [
            ("spec.volumes.[].persistentVolumeClaim.claimName", "string"),
            ("spec.domain.devices.disks.[].serial", "string"),
            ("status.phase", "string"),
            ("status.interfaces.[].ipAddress", "string"),
            ("status.volumeStatus.[].name", "string"),
            ("status.volumeStatus.[].target", "string"),
            ("status.volumeStatus.[].phase", "string"),
            ("status.volumeStatus.[].reason", "string"),
            ("status.volumeStatus.[].message", "string"),
            ("status.volumeStatus.[].hotplugVolume.attachPodName", "string"),
        ] {
            assert_eq!(at(vmi, path), kind, "VirtualMachineInstance {path}");
        }
    }
}
