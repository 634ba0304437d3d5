//! Whole decK documents in and out of the store: `meshgate config import/export`, ids given
//! on load as Kong gives them, and dumps without generated fields as `deck gateway dump`
//! writes them.

use serde_json::{Map, Value};

use super::entities::new_id;
use super::*;

/// decK fields holding arrays of entities, at any depth.
pub(super) const ENTITY_ARRAYS: [&str; 12] = [
    "services",
    "routes",
    "plugins",
    "consumers",
    "upstreams",
    "targets",
    "certificates",
    "snis",
    "keyauth_credentials",
    "basicauth_credentials",
    "jwt_secrets",
    "acls",
];

/// Calls `visit` on every entity of a decK document, at any depth (services, their routes,
/// the routes' plugins, consumers' credentials, ...).
pub(super) fn for_each_entity(value: &mut Value, visit: &mut impl FnMut(&mut Map<String, Value>)) {
    let Some(map) = value.as_object_mut() else { return };
    for (key, child) in map.iter_mut() {
        if !ENTITY_ARRAYS.contains(&key.as_str()) {
            continue;
        }
        for entity in child.as_array_mut().into_iter().flatten() {
            if let Some(fields) = entity.as_object_mut() {
                visit(fields);
            }
            for_each_entity(entity, visit);
        }
    }
}

/// Gives every entity without an `id` a new one, as Kong does when it loads a declarative
/// file, so the Admin API can address each of them.
pub(super) fn assign_ids(value: &mut Value) {
    for_each_entity(value, &mut |fields| {
        fields.entry("id").or_insert_with(|| Value::String(new_id()));
    });
}

/// Ids other entities refer to (`service: {id: ..}`, `route: <id>`, ...).
pub(super) fn referenced_ids(value: &Value, out: &mut std::collections::HashSet<String>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                // A service's `ca_certificates` lists the ids of CA certificate entities.
                if key == "ca_certificates"
                    && let Value::Array(ids) = child
                {
                    out.extend(ids.iter().filter_map(Value::as_str).map(str::to_string));
                }
                if ["service", "route", "consumer", "upstream", "certificate"].contains(&key.as_str()) {
                    match child {
                        Value::String(s) => {
                            out.insert(s.clone());
                        }
                        Value::Object(r) => {
                            if let Some(id) = r.get("id").and_then(Value::as_str) {
                                out.insert(id.to_string());
                            }
                        }
                        _ => {}
                    }
                }
                referenced_ids(child, out);
            }
        }
        Value::Array(items) => items.iter().for_each(|i| referenced_ids(i, out)),
        _ => {}
    }
}

/// The state as `deck gateway dump` writes it: timestamps dropped, and ids dropped unless
/// another entity refers to them (or `with_ids`).
pub(super) fn strip_generated(value: &mut Value, referenced: &std::collections::HashSet<String>, with_ids: bool) {
    for_each_entity(value, &mut |fields| {
        fields.remove("created_at");
        fields.remove("updated_at");
        let keep = with_ids
            || fields
                .get("id")
                .and_then(Value::as_str)
                .is_some_and(|id| referenced.contains(id));
        if !keep {
            fields.remove("id");
        }
    });
}

/// `meshgate config import`: validates a decK document and makes it the stored state (a
/// running proxy on the same database applies it within a second). Returns the new revision.
pub async fn import(
    location: &StoreLocation,
    deck: Value,
    options: &meshgate_model::CompileOptions,
) -> Result<i64, String> {
    let mut deck = deck;
    assign_ids(&mut deck);
    let docs = documents(location, &deck)?;
    if let Err(findings) = meshgate_model::compile(&docs, options) {
        let errors: Vec<String> = findings.errors().map(ToString::to_string).collect();
        return Err(errors.join("\n"));
    }
    let store = Store::open(location.clone()).await?;
    let (stored, ()) = store
        .update(|_| Change {
            write: Some(deck),
            answer: (),
        })
        .await?;
    Ok(stored.map_or(0, |s| s.revision))
}

/// `meshgate config export`: the stored state as a decK document.
pub async fn export(location: &StoreLocation, with_ids: bool) -> Result<Value, String> {
    let store = Store::open(location.clone()).await?;
    let mut document = store.load().await?.document;
    let mut referenced = std::collections::HashSet::new();
    referenced_ids(&document, &mut referenced);
    strip_generated(&mut document, &referenced, with_ids);
    Ok(document)
}
