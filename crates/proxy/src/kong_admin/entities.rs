//! CRUD on the stored decK document: where each kind of entity sits in it (top level, or
//! nested by decK in its parent), how Kong shows it, and how Kong creates, replaces and deletes
//! it.

use serde_json::{Map, Value, json};

use super::*;

/// A new entity id, a UUID as Kong gives them.
pub(super) fn new_id() -> String {
    crate::uuid::v4()
}

pub(super) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub(super) fn parse_body(body: &Bytes) -> Result<serde_json::Map<String, Value>, String> {
    if body.is_empty() {
        return Ok(serde_json::Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err("the body must be a JSON object".to_string()),
    }
}

/// Kong stores a service's `url` as `protocol`, `host`, `port` and `path`, so that later
/// changes to one of them apply.
pub(super) fn expand_url(fields: &mut serde_json::Map<String, Value>) -> Result<(), String> {
    let Some(url) = fields.remove("url") else { return Ok(()) };
    let Some(url) = url.as_str() else {
        return Err("url: expected a string".to_string());
    };
    let Some((protocol, rest)) = url.split_once("://") else {
        return Err(format!("url: not a URL: {url:?}"));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], Some(&rest[i..])),
        None => (rest, None),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.contains(']') || h.ends_with(']') => match p.parse::<u16>() {
            Ok(port) => (h, Some(port)),
            Err(_) => return Err(format!("url: bad port in {url:?}")),
        },
        _ => (authority, None),
    };
    let default_port = if protocol == "https" || protocol == "grpcs" {
        443
    } else {
        80
    };
    fields.insert("protocol".to_string(), json!(protocol));
    fields.insert(
        "host".to_string(),
        json!(host.trim_start_matches('[').trim_end_matches(']')),
    );
    fields.insert("port".to_string(), json!(port.unwrap_or(default_port)));
    if let Some(path) = path {
        fields.insert("path".to_string(), json!(path));
    }
    Ok(())
}

/// Where an entity sits in the decK document, and which parent decK nested it in.
pub(super) struct Entry {
    /// JSON pointer to the entity.
    pub(super) pointer: String,
    /// `("service", {"id": ..})` for a route nested in a service, and so on.
    pub(super) parent: Option<(&'static str, Value)>,
}

/// A parent's reference as Kong shows it: `{"id": ..}` (or the name when it has no id).
pub(super) fn reference(parent: &Value, name_field: &str) -> Value {
    match parent.get("id") {
        Some(id) => json!({"id": id}),
        None => json!({"name": parent.get(name_field).cloned().unwrap_or(Value::Null)}),
    }
}

/// Every entity of `collection`, wherever decK allows it: routes top-level or nested in a
/// service; plugins top-level or nested in a service, a route or a consumer.
pub(super) fn entries(state: &Value, collection: &str) -> Vec<Entry> {
    let mut out = Vec::new();
    let each = |pointer: &str| -> Vec<(String, Value)> {
        state
            .pointer(pointer)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .enumerate()
                    .map(|(i, v)| (format!("{pointer}/{i}"), v.clone()))
                    .collect()
            })
            .unwrap_or_default()
    };
    for (pointer, _) in each(&format!("/{collection}")) {
        out.push(Entry { pointer, parent: None });
    }
    match collection {
        "routes" => {
            for (service, s) in each("/services") {
                for (pointer, _) in each(&format!("{service}/routes")) {
                    out.push(Entry {
                        pointer,
                        parent: Some(("service", reference(&s, "name"))),
                    });
                }
            }
        }
        "plugins" => {
            let mut routes: Vec<(String, Value)> = each("/routes");
            for (service, s) in each("/services") {
                for (pointer, _) in each(&format!("{service}/plugins")) {
                    out.push(Entry {
                        pointer,
                        parent: Some(("service", reference(&s, "name"))),
                    });
                }
                routes.extend(each(&format!("{service}/routes")));
            }
            for (route, r) in routes {
                for (pointer, _) in each(&format!("{route}/plugins")) {
                    out.push(Entry {
                        pointer,
                        parent: Some(("route", reference(&r, "name"))),
                    });
                }
            }
            for (consumer, c) in each("/consumers") {
                for (pointer, _) in each(&format!("{consumer}/plugins")) {
                    out.push(Entry {
                        pointer,
                        parent: Some(("consumer", reference(&c, "username"))),
                    });
                }
            }
        }
        _ => {}
    }
    out
}

/// Kong's defaults for fields an entity leaves out, as Kong's Admin API shows them (the stored
/// decK document keeps only what was given, so an export stays as written).
pub(super) fn with_kong_defaults(collection: &str, mut entity: Value) -> Value {
    let defaults = match collection {
        "services" => json!({
            "protocol": "http", "port": 80, "path": null, "retries": 5,
            "connect_timeout": 60000, "write_timeout": 60000, "read_timeout": 60000,
            "tags": null, "enabled": true, "tls_verify": null, "tls_verify_depth": null,
            "ca_certificates": null, "client_certificate": null,
        }),
        "routes" => json!({
            "protocols": ["http", "https"], "methods": null, "hosts": null, "paths": null,
            "headers": null, "snis": null, "sources": null, "destinations": null,
            "https_redirect_status_code": 426, "regex_priority": 0, "strip_path": true,
            "path_handling": "v0", "preserve_host": false, "request_buffering": true,
            "response_buffering": true, "tags": null,
        }),
        "consumers" => json!({"username": null, "custom_id": null, "tags": null}),
        "plugins" => json!({
            "enabled": true, "protocols": ["grpc", "grpcs", "http", "https"],
            "service": null, "route": null, "consumer": null, "config": {}, "tags": null,
        }),
        "upstreams" => json!({
            "algorithm": "round-robin", "hash_on": "none", "hash_fallback": "none",
            "hash_on_cookie_path": "/", "slots": 10000, "host_header": null,
            "use_srv_name": false, "tags": null,
        }),
        "targets" => json!({"weight": 100, "tags": null}),
        "certificates" => json!({"cert_alt": null, "key_alt": null, "snis": [], "tags": null}),
        "ca_certificates" => json!({"tags": null}),
        _ => return entity,
    };
    if let (Some(map), Value::Object(defaults)) = (entity.as_object_mut(), defaults) {
        for (field, value) in defaults {
            map.entry(field).or_insert(value);
        }
        if let Some(created) = map.get("created_at").cloned() {
            map.entry("updated_at").or_insert(created);
        }
    }
    entity
}

/// The entity as the Admin API shows it: with its parent's reference when decK nested it,
/// and Kong's defaults.
pub(super) fn view(state: &Value, entry: &Entry, collection: &str) -> Value {
    let mut entity = with_kong_defaults(
        collection,
        state.pointer(&entry.pointer).cloned().unwrap_or(Value::Null),
    );
    if let (Some((field, parent)), Some(map)) = (&entry.parent, entity.as_object_mut()) {
        map.insert(field.to_string(), parent.clone());
    }
    // Nested credentials and targets have their own endpoints, as in Kong.
    if let Some(map) = entity.as_object_mut() {
        for (_, _, field, _) in NESTED {
            if field != "snis" {
                map.remove(field);
            }
        }
        map.remove("routes");
        map.remove("plugins");
    }
    entity
}

/// True when `entity` is the one `key` (an id or its name) names.
pub(super) fn names(entity: &Value, key: &str, name_field: &str) -> bool {
    entity.get("id").and_then(Value::as_str) == Some(key) || entity.get(name_field).and_then(Value::as_str) == Some(key)
}

pub(super) fn find_entry(state: &Value, collection: &str, key: &str, name_field: &str) -> Option<Entry> {
    entries(state, collection)
        .into_iter()
        .find(|e| state.pointer(&e.pointer).is_some_and(|v| names(v, key, name_field)))
}

/// True when `entity` belongs to `parent` (given as its reference field and entity).
pub(super) fn belongs_to(state: &Value, entry: &Entry, field: &str, parent: &Value) -> bool {
    let entity = view(state, entry, "");
    let Some(reference) = entity.get(field).filter(|r| !r.is_null()) else {
        return false;
    };
    let key = match reference {
        Value::String(s) => Some(s.as_str()),
        Value::Object(map) => map.get("id").or_else(|| map.get("name")).and_then(Value::as_str),
        _ => None,
    };
    let name_field = if field == "consumer" { "username" } else { "name" };
    key.is_some_and(|k| names(parent, k, name_field))
}

/// `?size=N&offset=M` paging over `items`, Kong's `{"data": [...], "next": ...}` shape.
pub(super) fn page(items: Vec<Value>, query: &str, path: &str) -> Reply {
    let param = |name: &str| {
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    };
    let size = match param("size").map(|s| s.parse::<usize>()) {
        None => DEFAULT_PAGE_SIZE,
        Some(Ok(n)) if (1..=1000).contains(&n) => n,
        Some(_) => return schema_violation("size: must be between 1 and 1000"),
    };
    let offset = match param("offset").map(|s| s.parse::<usize>()) {
        None => 0,
        Some(Ok(n)) => n,
        Some(Err(_)) => {
            return reply(
                StatusCode::BAD_REQUEST,
                &json!({"code": 7, "name": "invalid offset", "message": "'offset' is not a valid offset"}),
            );
        }
    };
    let tags: Vec<String> = param("tags")
        .map(|t| t.split(',').map(str::to_string).collect())
        .unwrap_or_default();
    let items: Vec<Value> = items
        .into_iter()
        .filter(|item| {
            tags.is_empty()
                || tags.iter().all(|t| {
                    item.get("tags")
                        .and_then(Value::as_array)
                        .is_some_and(|have| have.iter().any(|h| h.as_str() == Some(t)))
                })
        })
        .collect();
    let end = (offset + size).min(items.len());
    let data: Vec<Value> = items
        .get(offset.min(end)..end)
        .map(<[Value]>::to_vec)
        .unwrap_or_default();
    let next = (end < items.len()).then(|| format!("/{path}?offset={end}&size={size}"));
    let mut body = json!({"data": data, "next": next});
    if next.is_some() {
        body["offset"] = json!(end.to_string());
    }
    reply(StatusCode::OK, &body)
}

/// Fills what Kong fills on create: `id`, `created_at`, and per-kind defaults.
pub(super) fn prepare_new(collection: &str, fields: &mut Map<String, Value>) -> Result<(), String> {
    if collection == "services" {
        expand_url(fields)?;
    }
    if collection == "certificates" {
        for required in ["cert", "key"] {
            if !fields.get(required).is_some_and(Value::is_string) {
                return Err(format!("{required}: required field missing"));
            }
        }
        // The Admin API takes `snis` as names; decK keeps `{name: ..}` objects.
        if let Some(Value::Array(snis)) = fields.get_mut("snis") {
            for sni in snis.iter_mut() {
                if let Value::String(name) = sni {
                    *sni = json!({"name": name.clone()});
                }
                if let Some(fields) = sni.as_object_mut() {
                    fields.entry("id").or_insert_with(|| Value::String(new_id()));
                }
            }
        }
    }
    if collection == "ca_certificates" {
        let digest = ca_certificate_digest(fields.get("cert"))?;
        fields.insert("cert_digest".to_string(), json!(digest));
    }
    fields.entry("id").or_insert_with(|| Value::String(new_id()));
    fields.entry("created_at").or_insert_with(|| json!(now_secs()));
    Ok(())
}

/// Kong's `cert_digest` of a CA certificate entity: the SHA-256 of its (first) certificate, in
/// hex. Errors name the field, as Kong's schema violations do.
fn ca_certificate_digest(cert: Option<&Value>) -> Result<String, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let Some(pem) = cert.and_then(Value::as_str) else {
        return Err("cert: required field missing".to_string());
    };
    let mut certs = CertificateDer::pem_slice_iter(pem.as_bytes());
    let Some(Ok(der)) = certs.next() else {
        return Err("cert: invalid certificate: no PEM certificate".to_string());
    };
    if certs.next().is_some() {
        return Err("cert: please submit only one certificate at a time".to_string());
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, der.as_ref());
    Ok(digest.as_ref().iter().map(|b| format!("{b:02x}")).collect())
}

/// The id in one entry of a service's `ca_certificates`: a string, or `{id: ..}`.
fn ca_reference_id(entry: &Value) -> Option<&str> {
    entry.as_str().or_else(|| entry.get("id").and_then(Value::as_str))
}

/// Kong's top-level credential endpoints (`/key-auths` and the like): every consumer's
/// credentials of one kind, each shown with its `consumer`; one is read, changed or deleted
/// by id, and `POST` takes the owner as `consumer` (`{"id": ..}`, an id or a username).
pub(super) fn credential_list(
    call: &Call<'_>,
    list: &str,
    nested: &str,
    rest: &[&str],
    state: Value,
    shared: &Shared,
    admin: &KongAdmin,
) -> Change<Reply> {
    let Some(&(_, _, field, naming)) = NESTED.iter().find(|(c, n, _, _)| *c == "consumers" && *n == nested) else {
        return not_found().into();
    };
    let consumers: Vec<Entry> = entries(&state, "consumers");
    // (the consumer's pointer, its reference, a credential) for every credential.
    let owned = || {
        consumers.iter().flat_map(|c| {
            let consumer = state.pointer(&c.pointer).cloned().unwrap_or(Value::Null);
            let items = consumer
                .get(field)
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let reference = reference(&consumer, "username");
            items
                .into_iter()
                .map(move |item| (c.pointer.clone(), reference.clone(), item))
        })
    };
    match (call.method, rest) {
        (&Method::GET, []) => {
            let items = owned()
                .map(|(_, reference, mut item)| {
                    if let Some(map) = item.as_object_mut() {
                        map.insert("consumer".to_string(), reference);
                    }
                    item
                })
                .collect();
            page(items, call.query, list).into()
        }
        (&Method::POST, []) => {
            let mut fields = match parse_body(call.body) {
                Ok(f) => f,
                Err(e) => return schema_violation(&e).into(),
            };
            let key = match fields.remove("consumer") {
                Some(Value::String(key)) => key,
                Some(Value::Object(r)) => match r.get("id").or_else(|| r.get("username")).and_then(Value::as_str) {
                    Some(key) => key.to_string(),
                    None => return schema_violation("consumer: required field missing").into(),
                },
                _ => return schema_violation("consumer: required field missing").into(),
            };
            let Some(owner) = find_entry(&state, "consumers", &key, "username") else {
                return schema_violation(&format!("consumer: the consumer {key:?} does not exist")).into();
            };
            let body = Bytes::from(Value::Object(fields).to_string());
            let call = Call {
                method: call.method,
                path: call.path,
                query: call.query,
                body: &body,
            };
            nested_entity(
                &call,
                &[],
                &format!("{}/{field}", owner.pointer),
                naming,
                state,
                shared,
                admin,
            )
        }
        // By id, or by the credential's own key (`key`, `username`, `group`), as in Kong.
        (_, [key]) => match owned().find(|(_, _, item)| names(item, key, naming)) {
            Some((_, reference, mut item)) if call.method == Method::GET => {
                if let Some(map) = item.as_object_mut() {
                    map.insert("consumer".to_string(), reference);
                }
                reply(StatusCode::OK, &item).into()
            }
            Some((pointer, _, item)) => {
                // A credential stays with its consumer here: `consumer` in a change is left out.
                let mut fields = match parse_body(call.body) {
                    Ok(f) => f,
                    Err(e) => return schema_violation(&e).into(),
                };
                fields.remove("consumer");
                let body = Bytes::from(Value::Object(fields).to_string());
                let call = Call {
                    method: call.method,
                    path: call.path,
                    query: call.query,
                    body: &body,
                };
                let id = item.get("id").and_then(Value::as_str).unwrap_or(key);
                nested_entity(&call, &[id], &format!("{pointer}/{field}"), "id", state, shared, admin)
            }
            None if call.method == Method::DELETE => no_content().into(),
            None => not_found().into(),
        },
        _ => not_found().into(),
    }
}

pub(super) fn conflict(field: &str, value: &str) -> Reply {
    reply(
        StatusCode::CONFLICT,
        &json!({"code": 5, "name": "unique constraint violation",
                "message": format!("UNIQUE violation detected on '{{{field}=\"{value}\"}}'")}),
    )
}

/// True for Kong's id format (a UUID), so `PUT /services/{key}` knows whether `key` is an id
/// or a name.
pub(super) fn is_uuid(key: &str) -> bool {
    key.len() == 36
        && key.char_indices().all(|(i, c)| {
            if [8, 13, 18, 23].contains(&i) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        })
}

/// Creates a top-level entity of `collection`: Kong's generated fields, `409` when its id or
/// `name_field` is taken, `201` with the entity as Kong shows it.
pub(super) fn create(
    collection: &str,
    name_field: &str,
    mut fields: Map<String, Value>,
    mut state: Value,
    shared: &Shared,
    admin: &KongAdmin,
) -> Change<Reply> {
    if let Err(e) = prepare_new(collection, &mut fields) {
        return schema_violation(&e).into();
    }
    // Kong keeps one CA certificate entity per certificate.
    for unique in ["id", name_field, "cert_digest"] {
        if let Some(value) = fields.get(unique).and_then(Value::as_str)
            && find_entry(&state, collection, value, unique).is_some()
        {
            return conflict(unique, value).into();
        }
    }
    let created = Value::Object(fields);
    push(&mut state, &format!("/{collection}"), created.clone());
    let shown = with_kong_defaults(collection, created);
    commit(shared, admin, state, StatusCode::CREATED, &shown)
}

/// CRUD on one collection, and the nested ones Kong has.
pub(super) fn entity(
    call: &Call<'_>,
    collection: &str,
    rest: &[&str],
    mut state: Value,
    shared: &Shared,
    admin: &KongAdmin,
) -> Change<Reply> {
    if collection == "snis" {
        return snis(call, rest, state, shared, admin);
    }
    let name_field = COLLECTIONS
        .iter()
        .find(|(c, _)| *c == collection)
        .map_or("name", |(_, f)| *f);
    match (call.method, rest) {
        (&Method::GET, []) => {
            let items = entries(&state, collection)
                .iter()
                .map(|e| view(&state, e, collection))
                .collect();
            page(items, call.query, collection).into()
        }
        (&Method::POST, []) => match parse_body(call.body) {
            Ok(fields) => create(collection, name_field, fields, state, shared, admin),
            Err(e) => schema_violation(&e).into(),
        },
        (_, [key]) => {
            let found = find_entry(&state, collection, key, name_field);
            match (call.method, found) {
                (&Method::GET, Some(entry)) => reply(StatusCode::OK, &view(&state, &entry, collection)).into(),
                (&Method::DELETE, Some(entry)) => {
                    // Routes refer to their service; Kong refuses to leave them dangling.
                    if collection == "services" {
                        let service = state.pointer(&entry.pointer).cloned().unwrap_or(Value::Null);
                        if entries(&state, "routes")
                            .iter()
                            .any(|r| belongs_to(&state, r, "service", &service))
                        {
                            return reply(
                                StatusCode::BAD_REQUEST,
                                &json!({"code": 9, "name": "foreign key violation",
                                        "message": "an existing 'routes' entity references this 'services' entity",
                                        "fields": {"@referenced_by": "routes"}}),
                            )
                            .into();
                        }
                    }
                    // Kong refuses to delete a CA certificate a service still lists.
                    if collection == "ca_certificates"
                        && let Some(id) = state
                            .pointer(&entry.pointer)
                            .and_then(|c| c.get("id"))
                            .and_then(Value::as_str)
                    {
                        let users: Vec<String> = entries(&state, "services")
                            .iter()
                            .filter_map(|e| state.pointer(&e.pointer))
                            .filter(|s| {
                                s.get("ca_certificates")
                                    .and_then(Value::as_array)
                                    .is_some_and(|ids| ids.iter().any(|i| ca_reference_id(i) == Some(id)))
                            })
                            .map(|s| s.get("id").and_then(Value::as_str).unwrap_or("?").to_string())
                            .collect();
                        if !users.is_empty() {
                            return schema_violation(&format!(
                                "ca certificate {id} is still referenced by services (id = {})",
                                users.join(", ")
                            ))
                            .into();
                        }
                    }
                    remove(&mut state, &entry.pointer);
                    commit(shared, admin, state, StatusCode::NO_CONTENT, &Value::Null)
                }
                // Kong answers 204 to deleting what does not exist.
                (&Method::DELETE, None) => no_content().into(),
                (&Method::PATCH, Some(entry)) => {
                    let mut fields = match parse_body(call.body) {
                        Ok(f) => f,
                        Err(e) => return schema_violation(&e).into(),
                    };
                    if collection == "services"
                        && let Err(e) = expand_url(&mut fields)
                    {
                        return schema_violation(&e).into();
                    }
                    // The server sets the digest; a new certificate gets its own, which must
                    // stay unique.
                    if collection == "ca_certificates" {
                        fields.remove("cert_digest");
                    }
                    if collection == "ca_certificates" && fields.contains_key("cert") {
                        match ca_certificate_digest(fields.get("cert")) {
                            Ok(digest) => {
                                if let Some(other) = find_entry(&state, collection, &digest, "cert_digest")
                                    && other.pointer != entry.pointer
                                {
                                    return conflict("cert_digest", &digest).into();
                                }
                                fields.insert("cert_digest".to_string(), json!(digest));
                            }
                            Err(e) => return schema_violation(&e).into(),
                        }
                    }
                    let Some(target) = state.pointer_mut(&entry.pointer) else {
                        return not_found().into();
                    };
                    for (k, v) in fields {
                        if k != "id" {
                            target[k] = v;
                        }
                    }
                    target["updated_at"] = json!(now_secs());
                    let shown = view(
                        &state,
                        &Entry {
                            pointer: entry.pointer.clone(),
                            parent: entry.parent,
                        },
                        collection,
                    );
                    commit(shared, admin, state, StatusCode::OK, &shown)
                }
                // PUT replaces the entity, or creates it under that id or name.
                (&Method::PUT, found) => {
                    let mut fields = match parse_body(call.body) {
                        Ok(f) => f,
                        Err(e) => return schema_violation(&e).into(),
                    };
                    let (pointer, parent) = match found {
                        Some(entry) => {
                            let old = state.pointer(&entry.pointer).cloned().unwrap_or(Value::Null);
                            for kept in ["id", "created_at"] {
                                if let Some(v) = old.get(kept) {
                                    fields.insert(kept.to_string(), v.clone());
                                }
                            }
                            (entry.pointer, entry.parent)
                        }
                        None => {
                            let field = if is_uuid(key) { "id" } else { name_field };
                            fields.insert(field.to_string(), json!(key));
                            let list = format!("/{collection}");
                            let len = state.pointer(&list).and_then(Value::as_array).map_or(0, Vec::len);
                            push(&mut state, &list, Value::Null);
                            (format!("{list}/{len}"), None)
                        }
                    };
                    if let Err(e) = prepare_new(collection, &mut fields) {
                        return schema_violation(&e).into();
                    }
                    if let Some(digest) = fields.get("cert_digest").and_then(Value::as_str)
                        && let Some(other) = find_entry(&state, collection, digest, "cert_digest")
                        && other.pointer != pointer
                    {
                        return conflict("cert_digest", digest).into();
                    }
                    fields.insert("updated_at".to_string(), json!(now_secs()));
                    if let Some(target) = state.pointer_mut(&pointer) {
                        // Nested children stay with their parent.
                        let children: Vec<(String, Value)> = target
                            .as_object()
                            .map(|m| {
                                m.iter()
                                    .filter(|(k, _)| {
                                        ["routes", "plugins"].contains(&k.as_str())
                                            || NESTED.iter().any(|(_, _, f, _)| f == k)
                                    })
                                    .map(|(k, v)| (k.clone(), v.clone()))
                                    .collect()
                            })
                            .unwrap_or_default();
                        for (k, v) in children {
                            fields.entry(k).or_insert(v);
                        }
                        *target = Value::Object(fields);
                    }
                    let shown = view(&state, &Entry { pointer, parent }, collection);
                    commit(shared, admin, state, StatusCode::OK, &shown)
                }
                (&Method::GET | &Method::PATCH, None) => not_found().into(),
                _ => message(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed").into(),
            }
        }
        (_, [key, nested, item @ ..]) => {
            let Some(parent_entry) = find_entry(&state, collection, key, name_field) else {
                return not_found().into();
            };
            let parent = state.pointer(&parent_entry.pointer).cloned().unwrap_or(Value::Null);
            let reference_field = match collection {
                "services" => Some("service"),
                "routes" => Some("route"),
                "consumers" => Some("consumer"),
                _ => None,
            };
            match (*nested, reference_field) {
                // Routes and plugins of a service (plugins of a route or consumer) are
                // top-level entities referring to it, or nested in it by decK.
                ("routes", Some("service")) | ("plugins", Some(_)) => {
                    let field = reference_field.unwrap_or("service");
                    match (call.method, item) {
                        (&Method::GET, []) => {
                            let items = entries(&state, nested)
                                .iter()
                                .filter(|e| belongs_to(&state, e, field, &parent))
                                .map(|e| view(&state, e, nested))
                                .collect();
                            page(items, call.query, &format!("{collection}/{key}/{nested}")).into()
                        }
                        (&Method::POST, []) => {
                            let mut fields = match parse_body(call.body) {
                                Ok(f) => f,
                                Err(e) => return schema_violation(&e).into(),
                            };
                            fields.insert(field.to_string(), reference(&parent, name_field));
                            let nested_name = if *nested == "routes" { "name" } else { "instance_name" };
                            create(nested, nested_name, fields, state, shared, admin)
                        }
                        _ => not_found().into(),
                    }
                }
                _ => match NESTED.iter().find(|(c, n, _, _)| *c == collection && n == nested) {
                    Some(&(_, _, field, naming)) => {
                        let list = format!("{}/{field}", parent_entry.pointer);
                        nested_entity(call, item, &list, naming, state, shared, admin)
                    }
                    None => not_found().into(),
                },
            }
        }
        _ => not_found().into(),
    }
}

/// CRUD on credentials, targets and SNIs, which decK keeps in their parent's `list`.
pub(super) fn nested_entity(
    call: &Call<'_>,
    item: &[&str],
    list: &str,
    naming: &str,
    mut state: Value,
    shared: &Shared,
    admin: &KongAdmin,
) -> Change<Reply> {
    let items: Vec<Value> = state
        .pointer(list)
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let field = list.rsplit('/').next().unwrap_or("");
    match (call.method, item) {
        (&Method::GET, []) => page(items, call.query, list.trim_start_matches('/')).into(),
        (&Method::POST, []) => {
            let mut fields = match parse_body(call.body) {
                Ok(f) => f,
                Err(e) => return schema_violation(&e).into(),
            };
            // Kong generates what a credential needs when it is not given.
            match field {
                "keyauth_credentials" => {
                    fields
                        .entry("key")
                        .or_insert_with(|| Value::String(new_id().replace('-', "")));
                }
                "jwt_secrets" => {
                    fields
                        .entry("key")
                        .or_insert_with(|| Value::String(new_id().replace('-', "")));
                    let algorithm = fields.get("algorithm").and_then(Value::as_str).unwrap_or("HS256");
                    if algorithm.starts_with("HS") {
                        fields
                            .entry("secret")
                            .or_insert_with(|| Value::String(new_id().replace('-', "")));
                    }
                }
                _ => {}
            }
            if let Some(value) = fields.get(naming).and_then(Value::as_str)
                && field != "targets"
                && field != "acls"
                && items
                    .iter()
                    .any(|i| i.get(naming).and_then(Value::as_str) == Some(value))
            {
                return conflict(naming, value).into();
            }
            fields.entry("id").or_insert_with(|| Value::String(new_id()));
            fields.entry("created_at").or_insert_with(|| json!(now_secs()));
            let created = Value::Object(fields);
            push(&mut state, list, created.clone());
            commit(shared, admin, state, StatusCode::CREATED, &created)
        }
        (_, [key]) => {
            let index = items.iter().position(|i| names(i, key, naming));
            match (call.method, index) {
                (&Method::GET, Some(i)) => reply(StatusCode::OK, &items[i]).into(),
                (&Method::DELETE, Some(i)) => {
                    remove(&mut state, &format!("{list}/{i}"));
                    commit(shared, admin, state, StatusCode::NO_CONTENT, &Value::Null)
                }
                (&Method::DELETE, None) => no_content().into(),
                (&Method::PATCH, Some(i)) => {
                    let fields = match parse_body(call.body) {
                        Ok(f) => f,
                        Err(e) => return schema_violation(&e).into(),
                    };
                    let mut updated = items[i].clone();
                    for (k, v) in fields {
                        if k != "id" {
                            updated[k] = v;
                        }
                    }
                    if let Some(target) = state.pointer_mut(&format!("{list}/{i}")) {
                        *target = updated.clone();
                    }
                    commit(shared, admin, state, StatusCode::OK, &updated)
                }
                _ => not_found().into(),
            }
        }
        _ => not_found().into(),
    }
}

/// `/snis`: Kong's SNI entities, kept by decK in their certificate's `snis`.
pub(super) fn snis(
    call: &Call<'_>,
    rest: &[&str],
    mut state: Value,
    shared: &Shared,
    admin: &KongAdmin,
) -> Change<Reply> {
    let all: Vec<(String, Value)> = entries(&state, "certificates")
        .into_iter()
        .flat_map(|cert| {
            let certificate = state.pointer(&cert.pointer).cloned().unwrap_or(Value::Null);
            let list = format!("{}/snis", cert.pointer);
            state
                .pointer(&list)
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .enumerate()
                .map(move |(i, sni)| {
                    let mut shown = sni;
                    shown["certificate"] = json!({"id": certificate.get("id")});
                    (format!("{list}/{i}"), shown)
                })
        })
        .collect();
    match (call.method, rest) {
        (&Method::GET, []) => page(all.into_iter().map(|(_, v)| v).collect(), call.query, "snis").into(),
        (&Method::POST, []) => {
            let mut fields = match parse_body(call.body) {
                Ok(f) => f,
                Err(e) => return schema_violation(&e).into(),
            };
            let Some(name) = fields.get("name").and_then(Value::as_str).map(str::to_string) else {
                return schema_violation("name: required field missing").into();
            };
            if all
                .iter()
                .any(|(_, s)| s.get("name").and_then(Value::as_str) == Some(&name))
            {
                return conflict("name", &name).into();
            }
            let certificate = fields
                .remove("certificate")
                .and_then(|c| c.get("id").and_then(Value::as_str).map(str::to_string));
            let Some(cert) = certificate.and_then(|id| find_entry(&state, "certificates", &id, "id")) else {
                return schema_violation("certificate: required field missing or not an existing certificate").into();
            };
            fields.entry("id").or_insert_with(|| Value::String(new_id()));
            fields.entry("created_at").or_insert_with(|| json!(now_secs()));
            let created = Value::Object(fields);
            push(&mut state, &format!("{}/snis", cert.pointer), created.clone());
            commit(shared, admin, state, StatusCode::CREATED, &created)
        }
        (_, [key]) => {
            let found = all.iter().find(|(_, s)| names(s, key, "name"));
            match (call.method, found) {
                (&Method::GET, Some((_, sni))) => reply(StatusCode::OK, sni).into(),
                (&Method::DELETE, Some((pointer, _))) => {
                    let pointer = pointer.clone();
                    remove(&mut state, &pointer);
                    commit(shared, admin, state, StatusCode::NO_CONTENT, &Value::Null)
                }
                (&Method::DELETE, None) => no_content().into(),
                _ => not_found().into(),
            }
        }
        _ => not_found().into(),
    }
}

/// Appends `value` to the array at `pointer`, creating the array when missing.
pub(super) fn push(state: &mut Value, pointer: &str, value: Value) {
    if state.pointer(pointer).is_none_or(|v| !v.is_array()) {
        let (parent, field) = pointer.rsplit_once('/').unwrap_or(("", pointer));
        if let Some(Value::Object(map)) = state.pointer_mut(parent) {
            map.insert(field.to_string(), json!([]));
        } else if parent.is_empty()
            && let Some(map) = state.as_object_mut()
        {
            map.insert(field.to_string(), json!([]));
        }
    }
    if let Some(Value::Array(array)) = state.pointer_mut(pointer) {
        array.push(value);
    }
}

/// Removes the array element at `pointer`.
pub(super) fn remove(state: &mut Value, pointer: &str) {
    let Some((list, index)) = pointer.rsplit_once('/') else {
        return;
    };
    let Ok(index) = index.parse::<usize>() else { return };
    if let Some(Value::Array(array)) = state.pointer_mut(list)
        && index < array.len()
    {
        array.remove(index);
    }
}
