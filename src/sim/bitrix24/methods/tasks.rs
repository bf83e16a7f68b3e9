//! `tasks.task.*`.

use super::*;

pub(super) fn task_json(st: &PortalState, t: &Task) -> Value {
    json!({
        "id": t.id.to_string(), "title": t.title, "description": t.description,
        "responsibleId": t.responsible_id.to_string(), "createdBy": t.created_by.to_string(),
        "deadline": t.deadline, "status": t.status.to_string(), "xmlId": t.xml_id,
        "createdDate": st.data.fmt(st.data.local(t.created_at)),
        "guid": format!("{{{:08x}-0000-4000-8000-{:012x}}}", t.id, t.id),
        "ufCrmTask": t.uf_crm_task,
    })
}

pub(super) fn task_add(
    st: &mut PortalState,
    caller: &Caller,
    p: &Map<String, Value>,
    now: DateTime<Utc>,
) -> ApiResult {
    let Some(f) = obj(p, "fields") else {
        return Err(err(400, "ERROR_CORE", "Fields are not specified"));
    };
    let title = s(f, "TITLE").unwrap_or_default();
    if title.trim().is_empty() {
        return Err(core("TITLE: field is required"));
    }
    let Some(responsible) = int(f, "RESPONSIBLE_ID") else {
        return Err(core("RESPONSIBLE_ID: field is required"));
    };
    if st.data.active_user(responsible as u64).is_none() {
        return Err(core("Responsible user not found"));
    }
    let deadline = match s(f, "DEADLINE") {
        Some(d) => Some(
            st.data
                .fmt(parse_iso(&d, st.data.tz).ok_or_else(|| core("DEADLINE: wrong date format"))?),
        ),
        None => None,
    };
    let id = st.data.id();
    let task = Task {
        id,
        title,
        description: s(f, "DESCRIPTION").unwrap_or_default(),
        responsible_id: responsible as u64,
        created_by: int(f, "CREATED_BY")
            .map(|x| x as u64)
            .unwrap_or(caller.user_id()),
        deadline,
        uf_crm_task: list_of_strings(get_ci(f, "UF_CRM_TASK")),
        status: 2,
        xml_id: s(f, "XML_ID"),
        created_at: now,
        user_fields: crate::sim::bitrix24::fields::user_values(f),
    };
    let mut body = task_json(st, &task);
    if let Some(m) = body.as_object_mut() {
        // §6: UF_CRM_TASK comes back only when selected.
        m.remove("ufCrmTask");
    }
    st.data.tasks.push(task);
    Ok(ApiOk::new(json!({"task": body})))
}

pub(super) fn task_list(st: &PortalState, p: &Map<String, Value>) -> ApiResult {
    let rows: Vec<Value> = st
        .data
        .tasks
        .iter()
        .map(|t| {
            json!({"ID": t.id.to_string(), "TITLE": t.title, "RESPONSIBLE_ID": t.responsible_id.to_string(),
                   "CREATED_BY": t.created_by.to_string(), "STATUS": t.status.to_string(), "XML_ID": t.xml_id,
                   "UF_CRM_TASK": t.uf_crm_task, "CREATED_DATE": st.data.fmt(st.data.local(t.created_at)), "DEADLINE": t.deadline})
        })
        .collect();
    let mut filter = obj(p, "filter").cloned().unwrap_or_default();
    let crm = filter
        .remove("UF_CRM_TASK")
        .map(|v| list_of_strings(Some(&v)));
    let rows: Vec<Value> = apply_filter(rows, Some(&filter), st.data.tz)
        .into_iter()
        .filter(|r| match &crm {
            Some(want) => list_of_strings(r.get("UF_CRM_TASK"))
                .iter()
                .any(|b| want.contains(b)),
            None => true,
        })
        .collect();
    let ids: Vec<u64> = rows
        .iter()
        .filter_map(|r| r["ID"].as_str().and_then(|s| s.parse().ok()))
        .collect();
    let tasks: Vec<Value> = ids
        .iter()
        .filter_map(|id| st.data.tasks.iter().find(|t| t.id == *id))
        .map(|t| task_json(st, t))
        .collect();
    let ok = paged(tasks, page(p));
    Ok(ApiOk {
        result: json!({"tasks": ok.result}),
        ..ok
    })
}

pub(super) fn task_update(st: &mut PortalState, p: &Map<String, Value>) -> ApiResult {
    let id = int(p, "taskId").unwrap_or(0) as u64;
    let fields = obj(p, "fields").cloned().unwrap_or_default();
    if fields.is_empty() {
        return Err(core("Fields are not specified"));
    }
    let tz = st.data.tz;
    let Some(t) = st.data.tasks.iter_mut().find(|t| t.id == id) else {
        return Err(err(400, "ERROR_CORE", "Task not found or not accessible"));
    };
    if let Some(v) = s(&fields, "TITLE") {
        t.title = v;
    }
    if let Some(v) = int(&fields, "RESPONSIBLE_ID") {
        t.responsible_id = v as u64;
    }
    if let Some(v) = s(&fields, "DESCRIPTION") {
        t.description = v;
    }
    if let Some(v) = s(&fields, "DEADLINE") {
        t.deadline = parse_iso(&v, tz).map(|d| d.to_rfc3339());
    }
    if get_ci(&fields, "UF_CRM_TASK").is_some() {
        t.uf_crm_task = list_of_strings(get_ci(&fields, "UF_CRM_TASK"));
    }
    let t = t.clone();
    Ok(ApiOk::new(json!({"task": task_json(st, &t)})))
}

pub(super) fn task_set_status(
    st: &mut PortalState,
    p: &Map<String, Value>,
    status: i64,
) -> ApiResult {
    let id = int(p, "taskId").unwrap_or(0) as u64;
    let Some(t) = st.data.tasks.iter_mut().find(|t| t.id == id) else {
        return Err(err(400, "ERROR_CORE", "Task not found or not accessible"));
    };
    t.status = status;
    let t = t.clone();
    Ok(ApiOk::new(json!({"task": task_json(st, &t)})))
}
