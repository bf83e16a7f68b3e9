//! CRM: `crm.duplicate.findbycomm`, leads and entity lists, call activities.

use super::*;

pub(super) fn findbycomm(st: &PortalState, p: &Map<String, Value>) -> ApiResult {
    let kind = s(p, "type").unwrap_or_default();
    if kind.is_empty() {
        return Err(err(400, "Communication type is not defined", ""));
    }
    if !kind.eq_ignore_ascii_case("PHONE") && !kind.eq_ignore_ascii_case("EMAIL") {
        return Err(err(
            400,
            &format!("Communication type '{kind}' is not supported in current context"),
            "",
        ));
    }
    let values = list_of_strings(get_ci(p, "values"));
    if values.is_empty() {
        return Err(err(400, "Communication values is not defined", ""));
    }
    if values.len() > 20 {
        return Err(err(
            400,
            "",
            "Too many communication values. The maximum is 20.",
        ));
    }
    let only = s(p, "entity_type").and_then(|t| kind_from(&t));
    let mut out = Map::new();
    for k in [CrmKind::Lead, CrmKind::Contact, CrmKind::Company] {
        if only.is_some_and(|o| o != k) {
            continue;
        }
        let mut ids: Vec<u64> = values
            .iter()
            .flat_map(|v| st.data.by_phone(v))
            .filter(|e| e.kind == k)
            .map(|e| e.id)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        if !ids.is_empty() {
            out.insert(k.as_str().into(), json!(ids));
        }
    }
    // §5.3: when one type has 20 or more matches, the others are silently left out.
    if let Some(full) = out
        .iter()
        .find(|(_, v)| v.as_array().is_some_and(|a| a.len() >= 20))
        .map(|(k, _)| k.clone())
    {
        out.retain(|k, _| *k == full);
    }
    Ok(ApiOk::new(if out.is_empty() {
        json!([])
    } else {
        Value::Object(out)
    }))
}

pub(super) fn multifield_values(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|i| i.get("VALUE").and_then(Value::as_str).map(str::to_string))
            .collect(),
        Some(Value::Object(m)) => m
            .values()
            .filter_map(|i| i.get("VALUE").and_then(Value::as_str).map(str::to_string))
            .collect(),
        _ => Vec::new(),
    }
}

pub(super) fn lead_add(st: &mut PortalState, caller: &Caller, p: &Map<String, Value>) -> ApiResult {
    let Some(fields) = obj(p, "fields") else {
        return Err(err(400, "", "The parameter 'fields' must be array."));
    };
    let id = st.data.id();
    let title = s(fields, "TITLE").unwrap_or_else(|| format!("Lead #{id}"));
    let assigned = int(fields, "ASSIGNED_BY_ID")
        .map(|x| x as u64)
        .unwrap_or(caller.user_id());
    st.data.entities.push(CrmEntity {
        kind: CrmKind::Lead,
        id,
        title,
        phones: multifield_values(get_ci(fields, "PHONE")),
        assigned_by_id: assigned,
        source: Some(s(fields, "SOURCE_ID").unwrap_or_else(|| "api".into())),
    });
    Ok(ApiOk::new(json!(id)))
}

pub(super) fn entity_list(st: &PortalState, p: &Map<String, Value>, kind: CrmKind) -> ApiResult {
    let rows: Vec<Value> = st
        .data
        .entities
        .iter()
        .filter(|e| e.kind == kind)
        .map(|e| {
            json!({"ID": e.id.to_string(), "TITLE": e.title, "ASSIGNED_BY_ID": e.assigned_by_id.to_string(),
                   "PHONE": e.phones.iter().map(|ph| json!({"VALUE": ph, "VALUE_TYPE": "WORK"})).collect::<Vec<_>>()})
        })
        .collect();
    let mut filter = obj(p, "filter").cloned().unwrap_or_default();
    let phone = filter.remove("PHONE").map(|v| value_text(&v));
    let rows = apply_filter(rows, Some(&filter), st.data.tz)
        .into_iter()
        .filter(|r| match &phone {
            Some(ph) => multifield_values(r.get("PHONE"))
                .iter()
                .any(|v| digits(v) == digits(ph)),
            None => true,
        })
        .collect();
    Ok(paged(select(rows, p), page(p)))
}

pub(super) fn activity_add(
    st: &mut PortalState,
    caller: &Caller,
    p: &Map<String, Value>,
) -> ApiResult {
    // §5.1: the older CRM methods answer with an empty `error` and the text in the description.
    let Some(f) = obj(p, "fields") else {
        return Err(err(400, "", "The parameter 'fields' must be array."));
    };
    let comms = get_ci(f, "COMMUNICATIONS").cloned().unwrap_or(Value::Null);
    let first = match &comms {
        Value::Array(a) => a.first().cloned(),
        Value::Object(m) => m.values().next().cloned(),
        _ => None,
    };
    let Some(first) = first.filter(|c| c.get("VALUE").is_some()) else {
        return Err(err(
            400,
            "",
            "The field COMMUNICATIONS is not defined or invalid.",
        ));
    };
    let type_id = int(f, "TYPE_ID").unwrap_or(0);
    if type_id == 0 {
        return Err(err(400, "", "The field TYPE_ID is not defined or invalid."));
    }
    let subject = s(f, "SUBJECT").unwrap_or_default();
    if subject.trim().is_empty() {
        return Err(err(400, "", "The field SUBJECT is not defined or empty."));
    }
    let owner_type = int(f, "OWNER_TYPE_ID").or_else(|| {
        first
            .get("ENTITY_TYPE_ID")
            .and_then(|v| value_text(v).parse().ok())
    });
    let owner_id = int(f, "OWNER_ID").or_else(|| {
        first
            .get("ENTITY_ID")
            .and_then(|v| value_text(v).parse().ok())
    });
    let (Some(owner_type), Some(owner_id)) = (owner_type, owner_id) else {
        return Err(err(400, "", "Could not build binding. Please ensure that owner info and communications are defined correctly."));
    };
    let owner_kind = match owner_type {
        1 => Some(CrmKind::Lead),
        3 => Some(CrmKind::Contact),
        4 => Some(CrmKind::Company),
        _ => None,
    };
    if owner_type != 2
        && !owner_kind.is_some_and(|k| {
            st.data
                .entities
                .iter()
                .any(|e| e.kind == k && e.id == owner_id as u64)
        })
    {
        return Err(err(400, "", "Could not build binding. Please ensure that owner info and communications are defined correctly."));
    }
    let responsible = int(f, "RESPONSIBLE_ID")
        .map(|x| x as u64)
        .unwrap_or(caller.user_id());
    if st.data.active_user(responsible).is_none() {
        return Err(err(400, "", "Responsible user is not found."));
    }
    let id = st.data.id();
    st.data.activities.push(Activity {
        id,
        owner_type_id: owner_type,
        owner_id: owner_id as u64,
        type_id,
        subject,
        direction: int(f, "DIRECTION").unwrap_or(0),
        start_time: s(f, "START_TIME"),
        end_time: s(f, "END_TIME"),
        completed: s(f, "COMPLETED").is_some_and(|c| c.eq_ignore_ascii_case("Y")),
        responsible_id: responsible,
        description: s(f, "DESCRIPTION").unwrap_or_default(),
        originator_id: s(f, "ORIGINATOR_ID"),
        origin_id: s(f, "ORIGIN_ID"),
        provider_id: s(f, "PROVIDER_ID").unwrap_or_else(|| "CRM_CALL".into()),
        communications: comms,
        user_fields: crate::sim::bitrix24::fields::user_values(f),
    });
    Ok(ApiOk::new(json!(id)))
}

pub(super) fn activity_update(st: &mut PortalState, p: &Map<String, Value>) -> ApiResult {
    let id = int(p, "id").unwrap_or(0) as u64;
    let fields = obj(p, "fields").cloned().unwrap_or_default();
    if fields.is_empty() {
        return Err(err(400, "", "The parameter 'fields' must be array."));
    }
    let Some(a) = st.data.activities.iter_mut().find(|a| a.id == id) else {
        return Err(err(400, "", "Not found"));
    };
    if let Some(d) = s(&fields, "DESCRIPTION") {
        a.description = d;
    }
    if let Some(d) = s(&fields, "SUBJECT") {
        a.subject = d;
    }
    if let Some(d) = s(&fields, "END_TIME") {
        a.end_time = Some(d);
    }
    Ok(ApiOk::new(json!(true)))
}

pub(super) fn activity_json(a: &Activity) -> Value {
    json!({
        "ID": a.id.to_string(), "OWNER_TYPE_ID": a.owner_type_id.to_string(), "OWNER_ID": a.owner_id.to_string(),
        "TYPE_ID": a.type_id.to_string(), "SUBJECT": a.subject, "DIRECTION": a.direction.to_string(),
        "START_TIME": a.start_time, "END_TIME": a.end_time, "COMPLETED": if a.completed { "Y" } else { "N" },
        "RESPONSIBLE_ID": a.responsible_id.to_string(), "DESCRIPTION": a.description,
        "ORIGINATOR_ID": a.originator_id, "ORIGIN_ID": a.origin_id, "PROVIDER_ID": a.provider_id,
        "PROVIDER_TYPE_ID": "CALL",
    })
}

pub(super) fn activity_list(st: &PortalState, p: &Map<String, Value>) -> ApiResult {
    let rows: Vec<Value> = st.data.activities.iter().map(activity_json).collect();
    let mut filter = obj(p, "filter").cloned();
    if st.cfg.activity_start_filter_ignores_offset {
        for (k, v) in filter.iter_mut().flat_map(|f| f.iter_mut()) {
            let wall = v.as_str().and_then(|t| t.get(..19)).map(str::to_string);
            if k.ends_with("START_TIME") {
                if let Some(wall) = wall {
                    *v = Value::String(format!("{wall}+00:00"));
                }
            }
        }
    }
    let rows = apply_filter(rows, filter.as_ref(), st.data.tz);
    let start = int(p, "start").unwrap_or(0);
    let rows = select(rows, p);
    if start < 0 {
        // `start=-1` skips counting (§1.4).
        let rows: Vec<Value> = rows.into_iter().take(50).collect();
        return Ok(ApiOk::new(Value::Array(rows)));
    }
    Ok(paged(rows, start as usize))
}
