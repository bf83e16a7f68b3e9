//! `telephony.externalCall.*`, `voximplant.statistic.get` and external lines.

use super::*;

/// What the portal does itself when a user clicks a number: a registration without
/// `EXTERNAL_CALL_ID`. Returns its `CALL_ID`.
pub(in crate::sim::bitrix24) fn register_internal(
    st: &mut PortalState,
    p: &Map<String, Value>,
    now: DateTime<Utc>,
) -> String {
    register(st, &Caller::App { user_id: 1 }, p, now)
        .ok()
        .and_then(|ok| {
            ok.result
                .get("CALL_ID")
                .and_then(Value::as_str)
                .map(String::from)
        })
        .unwrap_or_default()
}

pub(super) fn register(
    st: &mut PortalState,
    _caller: &Caller,
    p: &Map<String, Value>,
    now: DateTime<Utc>,
) -> ApiResult {
    let user_id = resolve_user(st, p)?;
    let call_type = int(p, "TYPE").unwrap_or(0);
    if !(1..=5).contains(&call_type) {
        return Err(core("Unknown TYPE"));
    }
    let phone = s(p, "PHONE_NUMBER").unwrap_or_default();
    if !phone_ok(&phone) {
        return Err(core("Unsupported phone number format"));
    }
    let start_raw = s(p, "CALL_START_DATE");
    let start = match &start_raw {
        Some(raw) => parse_iso(raw, st.data.tz)
            .ok_or_else(|| core("CALL_START_DATE should be in the ISO-8601 format"))?,
        None => st.data.local(now),
    };
    let line = s(p, "LINE_NUMBER");
    let external = s(p, "EXTERNAL_CALL_ID");

    // §4.1: a repeat within 30 minutes with the same key returns the same unfinished call.
    if let Some(prev) = st.data.calls.iter().find(|c| {
        !c.finished
            && now - c.registered_at < Duration::minutes(30)
            && c.phone == phone
            && c.call_type == call_type
            && c.user_id == user_id
            && (line.is_none() || c.line_number == line)
            && (external.is_none() || c.external_call_id == external)
    }) {
        return Ok(ApiOk::new(register_result(prev)));
    }

    let mut crm_entity = match (s(p, "CRM_ENTITY_TYPE"), int(p, "CRM_ENTITY_ID")) {
        (Some(t), Some(id)) => kind_from(&t).map(|k| (k, id as u64)),
        _ => None,
    };
    if crm_entity.is_none() {
        let found = st.data.by_phone(&phone);
        let best = [CrmKind::Contact, CrmKind::Company, CrmKind::Lead]
            .iter()
            .find_map(|k| found.iter().find(|e| e.kind == *k).map(|e| (e.kind, e.id)));
        crm_entity = best;
    }
    let mut created_lead = None;
    if crm_entity.is_none() && int(p, "CRM_CREATE").unwrap_or(0) == 1 && st.cfg.lead_creation {
        let id = st.data.id();
        st.data.entities.push(CrmEntity {
            kind: CrmKind::Lead,
            id,
            title: format!(
                "{phone} - {}",
                if call_type == 1 {
                    "Outgoing call"
                } else {
                    "Incoming call"
                }
            ),
            phones: vec![phone.clone()],
            assigned_by_id: user_id,
            source: Some("telephony".into()),
        });
        created_lead = Some(id);
        crm_entity = Some((CrmKind::Lead, id));
    }
    let call = ExtCall {
        call_id: format!(
            "externalCall.{:032x}.{}",
            rand::random::<u128>(),
            now.timestamp()
        ),
        external_call_id: external,
        user_id,
        phone,
        call_type,
        line_number: line,
        start,
        start_raw,
        registered_at: now,
        finished: false,
        crm_entity,
        created_lead,
        show: int(p, "SHOW").unwrap_or(1) == 1,
    };
    let result = register_result(&call);
    st.data.calls.push(call);
    Ok(ApiOk::new(result))
}

pub(super) fn kind_from(t: &str) -> Option<CrmKind> {
    match t.to_uppercase().as_str() {
        "CONTACT" => Some(CrmKind::Contact),
        "LEAD" => Some(CrmKind::Lead),
        "COMPANY" => Some(CrmKind::Company),
        _ => None,
    }
}

pub(super) fn register_result(c: &ExtCall) -> Value {
    let mut v = json!({
        "CALL_ID": c.call_id,
        "CRM_CREATED_LEAD": c.created_lead,
        "CRM_CREATED_ENTITIES": c.created_lead.map(|id| json!([{"ENTITY_TYPE": "LEAD", "ENTITY_ID": id}])).unwrap_or(json!([])),
        "CRM_ENTITY_TYPE": c.crm_entity.map(|(k, _)| k.as_str()).unwrap_or(""),
        "CRM_ENTITY_ID": c.crm_entity.map(|(_, id)| id),
    });
    if c.crm_entity.is_none() {
        v["LEAD_CREATION_ERROR"] = json!("Lead creation is disabled for local users");
    }
    v
}

pub(super) const STATUS_CODES: &[&str] = &[
    "200", "304", "603", "603-S", "403", "404", "486", "484", "503", "480", "402", "423", "OTHER",
];

pub(super) fn finish(st: &mut PortalState, p: &Map<String, Value>) -> ApiResult {
    let call_id = match get_ci(p, "CALL_ID") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => return Err(err(400, "INVALID_ARGUMENT", "CALL_ID must be a string")),
    };
    let user_id = resolve_user(st, p)?;
    let Some(idx) = st
        .data
        .calls
        .iter()
        .position(|c| c.call_id == call_id && !c.finished)
    else {
        // §4.2: unknown and already-finished calls get the same answer, so finish is not idempotent.
        return Err(core(
            "Call is not found (call should be registered prior to finishing",
        ));
    };
    let duration = int(p, "DURATION").unwrap_or(0).max(0);
    let status = s(p, "STATUS_CODE").unwrap_or_else(|| {
        if duration > 0 {
            "200".into()
        } else {
            "304".into()
        }
    });
    let status = if STATUS_CODES.contains(&status.as_str()) {
        status
    } else {
        "OTHER".into()
    };
    let add_to_chat = int(p, "ADD_TO_CHAT").unwrap_or(1) == 1;
    st.data.calls[idx].finished = true;
    let call = st.data.calls[idx].clone();
    let stat_id = st.data.stats.len() as u64 + 1;

    // Only finish creates the CRM call activity (§4), bound to the call's entity.
    let activity_id = call.crm_entity.map(|(kind, owner)| {
        let id = st.data.id();
        let incoming = call.call_type != 1;
        let end = call.start + Duration::seconds(duration);
        st.data.activities.push(Activity {
            id,
            owner_type_id: match kind {
                CrmKind::Lead => 1,
                CrmKind::Contact => 3,
                CrmKind::Company => 4,
            },
            owner_id: owner,
            type_id: 2,
            subject: if incoming { "Incoming call" } else { "Outgoing call" }.into(),
            direction: if incoming { 1 } else { 2 },
            start_time: Some(st.data.fmt(call.start)),
            end_time: Some(st.data.fmt(end)),
            completed: true,
            responsible_id: user_id,
            description: String::new(),
            originator_id: None,
            origin_id: Some(format!("VI_{}", call.call_id)),
            provider_id: "VOXIMPLANT_CALL".into(),
            communications: json!([{"VALUE": call.phone, "ENTITY_ID": owner, "ENTITY_TYPE_ID": 0, "TYPE": "PHONE"}]),
            user_fields: Default::default(),
        });
        id
    });
    let mut row = StatRow {
        id: stat_id,
        call_id: call.call_id.clone(),
        external_call_id: call.external_call_id.clone(),
        portal_user_id: user_id,
        portal_number: call
            .line_number
            .clone()
            .unwrap_or_else(|| "REST_APP:3".into()),
        phone: call.phone.clone(),
        call_type: call.call_type,
        duration,
        start: call.start,
        status_code: status.clone(),
        failed_reason: s(p, "FAILED_REASON").unwrap_or_default(),
        crm_entity: call.crm_entity,
        crm_activity_id: activity_id,
        record_url: s(p, "RECORD_URL"),
        record_file_id: None,
        record_attachments: 0,
        record_content: None,
        add_to_chat,
    };
    if add_to_chat {
        st.data.notifications.push(
            json!({"USER_ID": user_id, "MESSAGE": format!("Call {} {}", call.phone, status)}),
        );
    }
    if row.record_url.is_some() && st.cfg.finish_record_downloads {
        row.record_file_id = Some(st.data.id());
        row.record_attachments = 1;
    }
    st.data.stats.push(row);
    Ok(ApiOk::new(json!({
        "CALL_ID": call.call_id,
        "EXTERNAL_CALL_ID": call.external_call_id,
        "PORTAL_USER_ID": user_id,
        "PHONE_NUMBER": call.phone,
        "PORTAL_NUMBER": call.line_number.unwrap_or_else(|| "REST_APP:3".into()),
        "INCOMING": call.call_type.to_string(),
        "CALL_DURATION": duration,
        "CALL_START_DATE": {},
        "CALL_STATUS": if status == "200" { 1 } else { 0 },
        "CALL_VOTE": int(p, "VOTE"),
        "COST": 0,
        "COST_CURRENCY": "",
        "CALL_FAILED_CODE": status,
        "CALL_FAILED_REASON": "",
        "REST_APP_ID": "3",
        "REST_APP_NAME": "ubsync",
        "CRM_ACTIVITY_ID": activity_id,
        "COMMENT": null,
        "CRM_ENTITY_TYPE": call.crm_entity.map(|(k, _)| k.as_str()).unwrap_or(""),
        "CRM_ENTITY_ID": call.crm_entity.map(|(_, id)| id),
        "ID": stat_id,
    })))
}

pub(super) fn attach_record(st: &mut PortalState, p: &Map<String, Value>) -> ApiResult {
    let call_id = s(p, "CALL_ID").unwrap_or_default();
    let url = s(p, "RECORD_URL");
    let filename = s(p, "FILENAME");
    let content = s(p, "FILE_CONTENT");
    let Some(idx) = st.data.stats.iter().position(|r| r.call_id == call_id) else {
        return Err(core(
            "Call is not found in the statistic table. Looks like it is not finished yet.",
        ));
    };
    if url.is_none() && filename.is_none() {
        return Err(core(
            "Required parameters are not set. Request should contain or URL or FILENAME parameter",
        ));
    }
    let name = filename.clone().or_else(|| {
        url.as_deref()
            .and_then(|u| u.rsplit('/').next().map(str::to_string))
    });
    if let Some(f) = &filename {
        let ext = f.rsplit('.').next().unwrap_or("").to_lowercase();
        if f.trim().is_empty() {
            return Err(core("File name is empty"));
        }
        if ext != "mp3" && ext != "wav" {
            return Err(core("Wrong file extension. Only wav and mp3 are allowed"));
        }
    }
    if filename.is_some() && url.is_none() && content.is_none() {
        return Ok(ApiOk::new(
            json!({"uploadUrl": format!("{}/rest/upload.json?token=telephony%7C{}", st.base_url, st.data.stats[idx].id), "fieldName": "file"}),
        ));
    }
    let _ = name;
    let bytes = match &content {
        Some(c) => {
            use base64::Engine as _;
            match base64::engine::general_purpose::STANDARD.decode(c.trim()) {
                Ok(b) if !b.is_empty() => Some(b),
                _ => return Err(core("File content is empty or not base64")),
            }
        }
        None => None,
    };
    let file_id = st.data.id();
    let row = &mut st.data.stats[idx];
    row.record_url = url.or(Some(format!("content:{}", filename.unwrap_or_default())));
    row.record_file_id = Some(file_id);
    row.record_attachments += 1;
    row.record_content = bytes;
    Ok(ApiOk::new(json!({"FILE_ID": file_id})))
}

pub(super) fn search_crm(st: &PortalState, p: &Map<String, Value>) -> ApiResult {
    let phone = s(p, "PHONE_NUMBER").unwrap_or_default();
    if phone.is_empty() {
        return Err(core("PHONE_NUMBER is empty"));
    }
    let found: Vec<Value> = st
        .data
        .by_phone(&phone)
        .into_iter()
        .map(|e| {
            json!({
                "CRM_ENTITY_TYPE": e.kind.as_str(), "CRM_ENTITY_ID": e.id, "ASSIGNED_BY_ID": e.assigned_by_id,
                "NAME": e.title,
                "ASSIGNED_BY": {"ID": e.assigned_by_id.to_string(), "TIMEMAN_STATUS": "OPENED", "USER_PHONE_INNER":
                    st.data.users.iter().find(|u| u.id == e.assigned_by_id).and_then(|u| u.inner.clone()),
                    "WORK_PHONE": null, "PERSONAL_PHONE": null, "PERSONAL_MOBILE": null},
            })
        })
        .collect();
    Ok(ApiOk::new(Value::Array(found)))
}

pub(super) fn line_add(st: &mut PortalState, p: &Map<String, Value>) -> ApiResult {
    let number = s(p, "NUMBER").unwrap_or_default();
    if number.is_empty() {
        return Err(core("NUMBER should not be empty"));
    }
    if st.data.lines.iter().any(|l| l.number == number) {
        return Err(core("Line already exists"));
    }
    let id = st.data.lines.len() as u64 + 1;
    st.data.lines.push(ExternalLine {
        number: number.clone(),
        name: s(p, "NAME").unwrap_or_else(|| number.clone()),
        crm_auto_create: s(p, "CRM_AUTO_CREATE").unwrap_or_else(|| "Y".into()),
    });
    Ok(ApiOk::new(json!({"ID": id})))
}

pub(super) fn stat_json(st: &PortalState, r: &StatRow) -> Value {
    json!({
        "ID": r.id.to_string(), "CALL_ID": r.call_id, "EXTERNAL_CALL_ID": r.external_call_id,
        "PORTAL_USER_ID": r.portal_user_id.to_string(), "PORTAL_NUMBER": r.portal_number,
        "PHONE_NUMBER": r.phone, "CALL_TYPE": r.call_type.to_string(), "CALL_CATEGORY": "external",
        "CALL_DURATION": r.duration.to_string(), "CALL_START_DATE": st.data.fmt(r.start),
        "CALL_FAILED_CODE": r.status_code, "CALL_FAILED_REASON": r.failed_reason,
        "CALL_RECORD_URL": r.record_url.clone().unwrap_or_default(),
        "RECORD_FILE_ID": r.record_file_id.map(|id| id.to_string()),
        "CALL_VOTE": "0", "COST": "0.0000", "COST_CURRENCY": "",
        "CRM_ENTITY_TYPE": r.crm_entity.map(|(k, _)| k.as_str()), "CRM_ENTITY_ID": r.crm_entity.map(|(_, id)| id.to_string()),
        "CRM_ACTIVITY_ID": r.crm_activity_id.map(|id| id.to_string()),
        "REST_APP_ID": "3", "REST_APP_NAME": "ubsync", "TRANSCRIPT_ID": null, "TRANSCRIPT_PENDING": "N",
        "SESSION_ID": null, "REDIAL_ATTEMPT": null, "COMMENT": null, "RECORD_DURATION": null,
    })
}

pub(super) fn statistic_get(st: &PortalState, p: &Map<String, Value>) -> ApiResult {
    let rows: Vec<Value> = st.data.stats.iter().map(|r| stat_json(st, r)).collect();
    let rows = apply_filter(rows, obj(p, "FILTER"), st.data.tz);
    let desc = s(p, "ORDER").is_some_and(|o| o.eq_ignore_ascii_case("DESC"));
    let mut rows = rows;
    if desc {
        rows.reverse();
    }
    Ok(paged(rows, page(p)))
}
