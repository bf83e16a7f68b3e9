//! Users and notifications: `user.get` by inner line (`UF_PHONE_INNER`), `im.notify.personal.add`.

use serde_json::{json, Value};

use crate::bitrix24::batch::Command;
use crate::bitrix24::wire::{as_i64, as_text};

/// `user.get` of the active user whose inner line is `line`.
pub fn user_by_inner_line(key: impl Into<String>, line: &str) -> Command {
    Command::new(
        key,
        "user.get",
        json!({"filter": {"UF_PHONE_INNER": line, "ACTIVE": true}, "select": ["ID"]}),
    )
}

/// `user.get` of an active user by id, with their inner line.
pub fn user_by_id(key: impl Into<String>, user_id: i64) -> Command {
    Command::new(
        key,
        "user.get",
        json!({"filter": {"ID": user_id, "ACTIVE": true}, "select": ["ID", "UF_PHONE_INNER"]}),
    )
}

/// The first user's inner line in a `user.get` answer (`None`: nobody, or no line).
pub fn first_inner_line(v: &Value) -> Option<String> {
    v.as_array()?
        .first()?
        .get("UF_PHONE_INNER")
        .and_then(as_text)
        .filter(|l| !l.trim().is_empty())
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
        assert_eq!(
            first_inner_line(&json!([{"ID": 5, "UF_PHONE_INNER": "101"}])).as_deref(),
            Some("101")
        );
        assert_eq!(
            first_inner_line(&json!([{"ID": 5, "UF_PHONE_INNER": " "}])),
            None
        );
        let c = notify("n0", 5, "m", None);
        assert!(!c.params.contains_key("TAG"));
    }
}
