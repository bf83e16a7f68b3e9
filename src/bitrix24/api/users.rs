//! Users and notifications: `user.get` by inner line (`UF_PHONE_INNER`), `im.notify.personal.add`.

use serde_json::{json, Value};

use crate::bitrix24::batch::Command;
use crate::bitrix24::wire::as_i64;

/// `user.get` of the active user whose inner line is `line`.
pub fn user_by_inner_line(key: impl Into<String>, line: &str) -> Command {
    Command::new(
        key,
        "user.get",
        json!({"filter": {"UF_PHONE_INNER": line, "ACTIVE": true}, "select": ["ID"]}),
    )
}

/// The first user's id of a `user.get` answer (`None`: nobody).
pub fn first_user_id(v: &Value) -> Option<i64> {
    v.as_array()?.first()?.get("ID").and_then(as_i64)
}

/// `im.notify.personal.add`; a `tag` replaces an earlier notification with the same tag.
pub fn notify(key: impl Into<String>, user_id: i64, message: &str, tag: Option<String>) -> Command {
    let mut p = json!({"USER_ID": user_id, "MESSAGE": message});
    if let Some(t) = tag {
        p["TAG"] = json!(t);
    }
    Command::new(key, "im.notify.personal.add", p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nobody_is_an_empty_list() {
        assert_eq!(first_user_id(&json!([{"ID": "12"}])), Some(12));
        assert_eq!(first_user_id(&json!([])), None);
        assert_eq!(first_user_id(&json!({})), None);
        let c = notify("n0", 5, "m", None);
        assert!(!c.params.contains_key("TAG"));
    }
}
