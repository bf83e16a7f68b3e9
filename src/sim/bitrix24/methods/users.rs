//! `user.current`, `user.get`, and who a telephony call belongs to.

use super::*;

pub(super) fn user_json(u: &PortalUser) -> Value {
    json!({
        "ID": u.id.to_string(), "ACTIVE": u.active, "NAME": u.name, "LAST_NAME": u.last_name,
        "EMAIL": u.email, "UF_PHONE_INNER": u.inner, "IS_ONLINE": "Y", "UF_DEPARTMENT": [1],
        "TIME_ZONE": "", "USER_TYPE": "employee",
    })
}

pub(super) fn user_current(st: &PortalState, caller: &Caller) -> ApiResult {
    st.data
        .users
        .iter()
        .find(|u| u.id == caller.user_id())
        .map(|u| ApiOk::new(user_json(u)))
        .ok_or_else(|| err(401, "NO_AUTH_FOUND", "Wrong authorization data"))
}

pub(super) fn user_get(st: &PortalState, p: &Map<String, Value>) -> ApiResult {
    // §7: filter keys may come under FILTER/filter or at the top level.
    let mut filter = obj(p, "filter").cloned().unwrap_or_default();
    for (k, v) in p {
        let (_, field) = split_op(k);
        let upper = field.to_uppercase();
        if !matches!(
            upper.as_str(),
            "FILTER" | "SORT" | "ORDER" | "SELECT" | "START" | "ADMIN_MODE"
        ) {
            filter.insert(k.clone(), v.clone());
        }
    }
    let rows: Vec<Value> = st.data.users.iter().map(user_json).collect();
    let rows: Vec<Value> = rows
        .into_iter()
        .filter(|row| {
            filter.iter().all(|(k, want)| {
                let (op, field) = split_op(k);
                let have = row
                    .as_object()
                    .and_then(|o| get_ci(o, field))
                    .cloned()
                    .unwrap_or(Value::Null);
                if field.eq_ignore_ascii_case("ACTIVE") {
                    let want_active = truthy(want) || value_text(want).eq_ignore_ascii_case("y");
                    return have.as_bool() == Some(want_active);
                }
                filter_matches(op, &have, want, st.data.tz)
            })
        })
        .collect();
    let rows = select(rows, p);
    Ok(paged(rows, page(p)))
}

pub(super) fn resolve_user(st: &PortalState, p: &Map<String, Value>) -> Result<u64, ApiError> {
    let user = if let Some(id) = int(p, "USER_ID") {
        st.data.active_user(id as u64)
    } else if let Some(inner) = s(p, "USER_PHONE_INNER") {
        st.data
            .users
            .iter()
            .find(|u| u.active && u.inner.as_deref() == Some(inner.as_str()))
    } else {
        return Err(core("USER_ID or USER_PHONE_INNER should be set"));
    };
    user.map(|u| u.id)
        .ok_or_else(|| core("User is not found or is not active"))
}
