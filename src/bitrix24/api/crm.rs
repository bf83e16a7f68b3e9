//! CRM entities and call activities (`bitrix24-api.md` §5): `crm.duplicate.findbycomm`,
//! `telephony.externalCall.searchCrmEntities`, `crm.{lead,contact,company}.list`,
//! `crm.lead.add`, `crm.activity.add` / `update` / `list`.

use serde_json::{json, Map, Value};

use crate::bitrix24::batch::Command;
use crate::bitrix24::wire::{as_i64, as_text};
use crate::config::Config;

/// Who created an activity or lead (with `ORIGIN_ID = unitalk-<id>`).
pub const ORIGINATOR: &str = "ubsync";

/// A CRM entity as Bitrix24 names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entity {
    /// `CONTACT`, `LEAD` or `COMPANY`.
    pub kind: String,
    pub id: i64,
}

impl Entity {
    /// The entity's card in the portal (`{origin}/crm/contact/details/797/`).
    pub fn link(&self, cfg: &Config) -> Option<String> {
        let kind = match self.kind.as_str() {
            "CONTACT" => "contact",
            "COMPANY" => "company",
            "LEAD" => "lead",
            _ => return None,
        };
        Some(format!(
            "{}/crm/{kind}/details/{}/",
            cfg.bitrix24.portal_origin()?,
            self.id
        ))
    }

    /// `UF_CRM_TASK` binding: `C_5`, `L_5`, `CO_5`.
    pub fn binding(&self) -> Option<String> {
        let prefix = match self.kind.as_str() {
            "CONTACT" => "C",
            "LEAD" => "L",
            "COMPANY" => "CO",
            _ => return None,
        };
        Some(format!("{prefix}_{}", self.id))
    }

    /// `OWNER_TYPE_ID` of `crm.activity.add`.
    pub fn owner_type_id(&self) -> Option<i64> {
        match self.kind.as_str() {
            "LEAD" => Some(1),
            "CONTACT" => Some(3),
            "COMPANY" => Some(4),
            _ => None,
        }
    }
}

/// `crm.duplicate.findbycomm` for one phone number (§5.3).
pub fn find_by_phone(key: impl Into<String>, number: &str) -> Command {
    Command::new(
        key,
        "crm.duplicate.findbycomm",
        json!({"type": "PHONE", "values": [number]}),
    )
}

/// A `findbycomm` answer: the ids found per entity type (`{"CONTACT": [5, 7]}`; `[]` is none).
pub fn found_by_phone(v: &Value) -> Vec<(String, Vec<i64>)> {
    let Value::Object(m) = v else {
        return Vec::new();
    };
    m.iter()
        .map(|(kind, ids)| {
            let ids = ids
                .as_array()
                .map(|a| a.iter().filter_map(as_i64).collect())
                .unwrap_or_default();
            (kind.clone(), ids)
        })
        .collect()
}

/// `telephony.externalCall.searchCrmEntities` for a number (§4.4).
pub fn search_entities(key: impl Into<String>, number: &str) -> Command {
    Command::new(
        key,
        "telephony.externalCall.searchCrmEntities",
        json!({"PHONE_NUMBER": number}),
    )
}

/// An entity with its responsible user, from `searchCrmEntities` or an entity list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Responsible {
    pub entity: Entity,
    pub user_id: i64,
}

/// A `searchCrmEntities` answer: the entities with a type, an id and a responsible.
pub fn searched_entities(v: &Value) -> Vec<Responsible> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| {
                    Some(Responsible {
                        entity: Entity {
                            kind: e.get("CRM_ENTITY_TYPE").and_then(as_text)?,
                            id: e.get("CRM_ENTITY_ID").and_then(as_i64)?,
                        },
                        user_id: e.get("ASSIGNED_BY_ID").and_then(as_i64)?,
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `crm.<kind>.list` of the entities with these ids, with their responsibles.
pub fn entities_by_id(key: impl Into<String>, kind: &str, ids: &[i64]) -> Command {
    Command::new(
        key,
        format!("crm.{}.list", kind.to_lowercase()),
        json!({"filter": {"@ID": ids}, "select": ["ID", "ASSIGNED_BY_ID"]}),
    )
}

/// The entity type an [`entities_by_id`] command lists (`crm.contact.list` → `CONTACT`).
pub fn listed_kind(method: &str) -> String {
    method
        .trim_start_matches("crm.")
        .trim_end_matches(".list")
        .to_uppercase()
}

/// An entity list answer: (id, responsible) of each row that has both.
pub fn listed_responsibles(v: &Value) -> Vec<(i64, i64)> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| {
                    Some((
                        e.get("ID").and_then(as_i64)?,
                        e.get("ASSIGNED_BY_ID").and_then(as_i64)?,
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `crm.lead.add` for an unknown number.
pub struct NewLead<'a> {
    pub title: String,
    pub phone: &'a str,
    pub source: &'a str,
    pub assigned: i64,
    pub origin_id: &'a str,
    /// Rendered `rules.fields.lead`.
    pub extra: Map<String, Value>,
}

impl NewLead<'_> {
    pub fn command(self, key: impl Into<String>) -> Command {
        let mut fields = json!({
            "TITLE": self.title,
            "PHONE": [{"VALUE": self.phone, "VALUE_TYPE": "WORK"}],
            "SOURCE_ID": self.source, "ASSIGNED_BY_ID": self.assigned,
            "ORIGINATOR_ID": ORIGINATOR, "ORIGIN_ID": self.origin_id,
        });
        if let Value::Object(m) = &mut fields {
            m.extend(self.extra);
        }
        Command::new(key, "crm.lead.add", json!({ "fields": fields }))
    }
}

/// A lead's title, as planned (for a dry run's listing).
pub fn lead_title(c: &Command) -> String {
    c.params
        .get("fields")
        .and_then(|f| f.get("TITLE"))
        .and_then(as_text)
        .unwrap_or_default()
}

/// `crm.activity.add` of a call activity (§5.1).
pub struct CallActivity<'a> {
    pub owner: &'a Entity,
    pub phone: &'a str,
    pub subject: String,
    /// RFC 3339 with the portal's offset.
    pub start: String,
    pub end: String,
    pub incoming: bool,
    pub responsible: i64,
    pub description: String,
    /// `unitalk-<id>`, by which the activity is found again.
    pub origin_id: &'a str,
    /// Rendered `rules.fields.activity`.
    pub extra: Map<String, Value>,
}

impl CallActivity<'_> {
    pub fn command(self, key: impl Into<String>) -> Command {
        let owner_type = self.owner.owner_type_id();
        let mut fields = json!({
            "OWNER_TYPE_ID": owner_type, "OWNER_ID": self.owner.id, "TYPE_ID": 2,
            "COMMUNICATIONS": [{"VALUE": self.phone, "ENTITY_ID": self.owner.id, "ENTITY_TYPE_ID": owner_type, "TYPE": "PHONE"}],
            "SUBJECT": self.subject,
            "START_TIME": self.start,
            "END_TIME": self.end,
            "COMPLETED": "Y", "DIRECTION": if self.incoming { 1 } else { 2 }, "PRIORITY": 2,
            "RESPONSIBLE_ID": self.responsible,
            "DESCRIPTION": self.description, "DESCRIPTION_TYPE": 1,
            "ORIGINATOR_ID": ORIGINATOR, "ORIGIN_ID": self.origin_id,
        });
        if let Value::Object(m) = &mut fields {
            m.extend(self.extra);
        }
        Command::new(key, "crm.activity.add", json!({ "fields": fields }))
    }
}

/// `crm.activity.update` of an activity's description and end time.
pub fn activity_update(
    key: impl Into<String>,
    id: i64,
    description: String,
    end: String,
) -> Command {
    Command::new(
        key,
        "crm.activity.update",
        json!({"id": id, "fields": {"DESCRIPTION": description, "DESCRIPTION_TYPE": 1, "END_TIME": end}}),
    )
}

/// The activity ubsync wrote for a call, by `ORIGIN_ID`.
pub fn activity_of(key: impl Into<String>, origin_id: &str) -> Command {
    Command::new(
        key,
        "crm.activity.list",
        json!({"filter": {"ORIGINATOR_ID": ORIGINATOR, "ORIGIN_ID": origin_id}, "select": ["ID", "OWNER_TYPE_ID", "OWNER_ID", "ORIGIN_ID"]}),
    )
}

/// The parameters of one page of ubsync's activities started in `[from, to)`.
pub fn activities_by_start(from: &str, to: &str, start: u64) -> Value {
    json!({"filter": {"ORIGINATOR_ID": ORIGINATOR, ">=START_TIME": from, "<START_TIME": to}, "select": ["ID", "ORIGIN_ID"], "order": {"ID": "ASC"}, "start": start})
}

/// The parameters of a page of any of ubsync's activities, whatever their time: an empty answer
/// proves the portal holds none of them.
pub fn any_activity_of_ours() -> Value {
    json!({"filter": {"ORIGINATOR_ID": ORIGINATOR}, "select": ["ID", "ORIGIN_ID"], "order": {"ID": "DESC"}, "start": 0})
}

/// The field of an activity row that carries ubsync's call key.
pub const ACTIVITY_KEY_FIELD: &str = "ORIGIN_ID";

/// An activity row's `ORIGIN_ID` (ubsync's call key).
pub fn origin_id(row: &Value) -> Option<String> {
    row.get(ACTIVITY_KEY_FIELD).and_then(as_text)
}

/// The activity for `origin_id` among a lookup's rows: the row carrying that `ORIGIN_ID`, or,
/// where the portal leaves `ORIGIN_ID` out of its rows, the first (the filter chose it). A
/// portal that ignored the filter answers rows for other calls: none of them is taken.
pub fn activity_for<'a>(rows: &'a [Value], origin_id: &str) -> Option<&'a Value> {
    if rows.iter().any(|r| r.get(ACTIVITY_KEY_FIELD).is_some()) {
        rows.iter()
            .find(|r| self::origin_id(r).as_deref() == Some(origin_id))
    } else {
        rows.first()
    }
}

/// An activity row's `ID`.
pub fn activity_id(row: &Value) -> Option<i64> {
    row.get("ID").and_then(as_i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_decode_what_the_portal_may_answer() {
        assert_eq!(
            found_by_phone(&json!({"CONTACT": ["5", 7], "LEAD": []})),
            vec![("CONTACT".into(), vec![5, 7]), ("LEAD".into(), vec![])]
        );
        assert!(found_by_phone(&json!([])).is_empty(), "[] for none");
        let r = searched_entities(&json!([
            {"CRM_ENTITY_TYPE": "CONTACT", "CRM_ENTITY_ID": 651, "ASSIGNED_BY_ID": "99"},
            {"CRM_ENTITY_TYPE": "LEAD", "CRM_ENTITY_ID": 5},
        ]));
        assert_eq!(r.len(), 1, "a row without a responsible is no answer");
        assert_eq!(r[0].user_id, 99);
        assert_eq!(listed_kind("crm.company.list"), "COMPANY");
        assert_eq!(
            listed_responsibles(&json!([{"ID": "3", "ASSIGNED_BY_ID": 4}, {"ID": 5}])),
            vec![(3, 4)]
        );
        assert_eq!(activity_id(&json!({"ID": "8"})), Some(8));
        assert_eq!(activity_id(&json!({})), None);
    }

    #[test]
    fn an_activity_carries_its_origin_and_the_rules_fields() {
        let owner = Entity {
            kind: "CONTACT".into(),
            id: 5,
        };
        let mut extra = Map::new();
        extra.insert("UF_CRM_X".into(), json!("y"));
        let c = CallActivity {
            owner: &owner,
            phone: "+380501112233",
            subject: "Incoming call".into(),
            start: "s".into(),
            end: "e".into(),
            incoming: true,
            responsible: 9,
            description: "d".into(),
            origin_id: "unitalk-7",
            extra,
        }
        .command("v_7");
        let f = &c.params["fields"];
        assert_eq!(f["OWNER_TYPE_ID"], json!(3));
        assert_eq!(f["ORIGIN_ID"], json!("unitalk-7"));
        assert_eq!(f["ORIGINATOR_ID"], json!("ubsync"));
        assert_eq!(f["UF_CRM_X"], json!("y"));
        assert_eq!(f["DIRECTION"], json!(1));
    }
}
