//! Business rules: which calls are pushed, which missed calls get a task, how client numbers
//! are rewritten, working hours and templates. Pure data and pure functions, applied while
//! planning, so every rule shows in `sync --dry-run` and `ubsync rules test`.

pub mod hours;
pub mod script;
pub mod template;

use std::collections::{BTreeMap, HashSet};

use chrono_tz::Tz;
use regex::Regex;

pub use hours::{AfterHours, Hours};
pub use template::Template;

use crate::sync::call::{CallFacts, Way};

/// A set of numbers: exact numbers, prefixes and regular expressions. Exact numbers and
/// prefixes compare digits only (`+380 50 111` and `380-50-111` are the same); expressions
/// match the E.164 form (`+380501112233`).
#[derive(Debug, Clone, Default)]
pub struct NumberSet {
    pub exact: HashSet<String>,
    pub prefixes: Vec<String>,
    pub regexes: Vec<Regex>,
}

/// Digits only.
pub fn digits(n: &str) -> String {
    n.chars().filter(char::is_ascii_digit).collect()
}

impl NumberSet {
    /// Adds one entry: `"+380501112233"`, `"prefix:+7"` or `"regex:^\\+3804"`.
    pub fn add(&mut self, entry: &str) -> Result<(), String> {
        let entry = entry.trim();
        if let Some(p) = entry.strip_prefix("prefix:") {
            let d = digits(p);
            if d.is_empty() {
                return Err(format!("`{entry}` has no digits to match"));
            }
            self.prefixes.push(d);
        } else if let Some(r) = entry.strip_prefix("regex:") {
            self.regexes.push(
                Regex::new(r).map_err(|e| format!("`{r}` is not a regular expression ({e})"))?,
            );
        } else {
            let d = digits(entry);
            if d.is_empty() {
                return Err(format!(
                    "`{entry}` is not a number (write \"+380501112233\", \"prefix:+7\" or \"regex:...\")"
                ));
            }
            self.exact.insert(d);
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.prefixes.is_empty() && self.regexes.is_empty()
    }

    pub fn contains(&self, number: &str) -> bool {
        let d = digits(number);
        (!d.is_empty() && self.exact.contains(&d))
            || self.prefixes.iter().any(|p| d.starts_with(p.as_str()))
            || self.regexes.iter().any(|r| r.is_match(number))
    }
}

/// One condition of a filter.
#[derive(Debug, Clone)]
pub enum Cond {
    Direction(Vec<Way>),
    /// Unitalk states (`ANSWER`, `NOANSWER`, ...), upper case.
    State(Vec<String>),
    Client(NumberSet),
    InnerLine(Vec<String>),
    OuterLine(NumberSet),
    /// `lastGroupName`, compared without case.
    Group(Vec<String>),
    /// Talk time strictly below this many seconds.
    TalkBelow(u32),
}

impl Cond {
    fn holds(&self, f: &CallFacts) -> bool {
        match self {
            Cond::Direction(w) => w.contains(&f.way),
            Cond::State(s) => s.iter().any(|s| s == f.state.as_str()),
            Cond::Client(set) => set.contains(&f.client_number),
            Cond::InnerLine(lines) => f
                .operator_line
                .as_ref()
                .is_some_and(|l| lines.iter().any(|x| x == l)),
            Cond::OuterLine(set) => f
                .outer
                .as_ref()
                .is_some_and(|o| set.contains(o) || set.exact.contains(&o.trim().to_lowercase())),
            Cond::Group(groups) => f
                .group
                .as_ref()
                .is_some_and(|g| groups.iter().any(|x| x.eq_ignore_ascii_case(g.trim()))),
            Cond::TalkBelow(s) => f.seconds_talk < *s,
        }
    }
}

/// A named filter: its conditions, all of which (or any of which) must hold.
#[derive(Debug, Clone)]
pub struct Filter {
    pub name: String,
    pub any: bool,
    pub conds: Vec<Cond>,
}

impl Filter {
    pub fn matches(&self, f: &CallFacts) -> bool {
        if self.any {
            self.conds.iter().any(|c| c.holds(f))
        } else {
            self.conds.iter().all(|c| c.holds(f))
        }
    }
}

/// An ordered rewrite of client numbers, applied to the number as Unitalk sent it, before it is
/// read as E.164: `"^8(0\\d{9})$"` → `"+38$1"`.
#[derive(Debug, Clone)]
pub struct Rewrite {
    pub pattern: Regex,
    pub replace: String,
}

/// What happens to a call whose client number cannot be read as a phone number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InvalidNumber {
    /// Quarantined with the reason (the default: an admin looks at it).
    #[default]
    Quarantine,
    /// Recorded as skipped.
    Skip,
    /// Pushed with the number as sent (digits and `+` only).
    Raw,
}

/// Who may own a call or its task, in `rules.responsible.order`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    /// The responsible of the client's CRM entity (tasks only: a call belongs to who took it).
    Crm,
    /// The Bitrix24 user of the operator's inner line.
    Operator,
    /// `rules.responsible.lines`: a user per company line.
    Line,
    /// `rules.responsible.groups`: a user per operator group.
    Group,
    /// `bitrix24.default_user_id`.
    Default,
}

/// The responsible order and its per-line and per-group users.
#[derive(Debug, Clone)]
pub struct Responsible {
    pub order: Vec<Who>,
    /// Company line (digits) → user.
    pub lines: std::collections::HashMap<String, i64>,
    /// Group (lower case) → user.
    pub groups: std::collections::HashMap<String, i64>,
}

impl Default for Responsible {
    fn default() -> Self {
        Self {
            order: vec![Who::Crm, Who::Operator, Who::Line, Who::Group, Who::Default],
            lines: Default::default(),
            groups: Default::default(),
        }
    }
}

impl Responsible {
    /// The first of the order that has a user for this call.
    pub fn pick(
        &self,
        f: &CallFacts,
        crm: Option<i64>,
        operator: Option<i64>,
        default: Option<i64>,
    ) -> Option<i64> {
        self.order.iter().find_map(|w| match w {
            Who::Crm => crm,
            Who::Operator => operator,
            Who::Line => f
                .outer
                .as_ref()
                .and_then(|o| self.lines.get(&digits(o)).copied()),
            Who::Group => f
                .group
                .as_ref()
                .and_then(|g| self.groups.get(&g.trim().to_lowercase()).copied()),
            Who::Default => default,
        })
    }
}

/// Which calls may create a CRM lead for an unknown number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeadsFor {
    All,
    Incoming,
    Outgoing,
    None,
}

impl LeadsFor {
    pub fn allows(self, way: Way) -> bool {
        match self {
            LeadsFor::All => true,
            LeadsFor::Incoming => way == Way::In,
            LeadsFor::Outgoing => way == Way::Out,
            LeadsFor::None => false,
        }
    }
}

/// Lead creation: for which calls, with which source and title.
#[derive(Debug, Clone)]
pub struct Leads {
    pub create: LeadsFor,
    /// `SOURCE_ID` of created leads (activity mode).
    pub source: String,
    pub title: Template,
}

impl Default for Leads {
    fn default() -> Self {
        Self {
            create: LeadsFor::All,
            source: "CALL".into(),
            title: Template::parse("Call from {client}").expect("default template"),
        }
    }
}

/// Notifications (`im.notify.personal.add`) about missed calls.
#[derive(Debug, Clone)]
pub struct Notify {
    /// Notify the task's responsible of each missed call.
    pub missed: bool,
    /// Also notify these users.
    pub supervisors: Vec<i64>,
    pub message: Template,
    /// At most one notification per client in this time.
    pub per_client: chrono::Duration,
    /// Calls older than this when their task is made are not notified (backfills, catch-ups).
    pub max_age: chrono::Duration,
}

impl Default for Notify {
    fn default() -> Self {
        Self {
            missed: false,
            supervisors: Vec::new(),
            message: Template::parse("Missed call from {client} at {started_local}")
                .expect("default template"),
            per_client: chrono::Duration::minutes(30),
            max_age: chrono::Duration::hours(2),
        }
    }
}

/// Inner lines: which statuses mean "offline", alerts to supervisors, and whether an offline
/// operator is passed over as a responsible.
#[derive(Debug, Clone)]
pub struct Lines {
    /// Unitalk statuses (upper case) that mean the line cannot take calls.
    pub offline: Vec<String>,
    /// Alert when a line has been offline this long (inside working hours, when set); `None`: no
    /// alerts.
    pub alert_after: Option<chrono::Duration>,
    pub supervisors: Vec<i64>,
    /// The responsible order skips the operator of an offline line.
    pub skip_offline_operator: bool,
}

impl Default for Lines {
    fn default() -> Self {
        Self {
            offline: ["OFFLINE", "UNREGISTERED", "UNAVAILABLE", "NOT_REGISTERED"]
                .map(String::from)
                .to_vec(),
            alert_after: None,
            supervisors: Vec::new(),
            skip_offline_operator: false,
        }
    }
}

impl Lines {
    pub fn is_offline(&self, status: &str) -> bool {
        self.offline
            .iter()
            .any(|s| s.eq_ignore_ascii_case(status.trim()))
    }
}

/// Field name → template.
pub type FieldMap = Vec<(String, Template)>;

/// Extra Bitrix24 fields written with what ubsync creates: field name → template.
#[derive(Debug, Clone, Default)]
pub struct Fields {
    pub task: FieldMap,
    pub activity: FieldMap,
    pub lead: FieldMap,
}

impl Fields {
    /// The fields of one kind rendered for a call, to merge into a write's `fields`.
    pub fn render(
        list: &[(String, Template)],
        values: &BTreeMap<&'static str, String>,
    ) -> serde_json::Map<String, serde_json::Value> {
        list.iter()
            .map(|(k, t)| (k.clone(), serde_json::Value::String(t.render(values))))
            .collect()
    }
}

/// Every rule of the `[rules]` section.
#[derive(Debug, Clone)]
pub struct Rules {
    /// Calls matching one of these are never pushed.
    pub skip: Vec<Filter>,
    /// Missed calls matching one of these get no task.
    pub skip_task: Vec<Filter>,
    pub rewrite: Vec<Rewrite>,
    pub invalid_number: InvalidNumber,
    pub hours: Option<Hours>,
    /// Calendars of operator groups (`lastGroupName`, lower case) that keep other hours.
    pub hours_by_group: std::collections::HashMap<String, Hours>,
    pub responsible: Responsible,
    pub leads: Leads,
    pub fields: Fields,
    pub notify: Notify,
    /// CRM entity types in the order a client number is matched (`CONTACT`, `COMPANY`, `LEAD`).
    pub crm_order: Vec<String>,
    /// Inner-line rewrites, applied to the operator's line before the Bitrix24 user lookup.
    pub rewrite_line: Vec<Rewrite>,
    /// `rules.script`, compiled.
    pub script: Option<script::Script>,
    pub lines: Lines,
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            skip: Vec::new(),
            skip_task: Vec::new(),
            rewrite: Vec::new(),
            invalid_number: InvalidNumber::default(),
            hours: None,
            hours_by_group: Default::default(),
            responsible: Responsible::default(),
            leads: Leads::default(),
            fields: Fields::default(),
            notify: Notify::default(),
            crm_order: ["CONTACT", "COMPANY", "LEAD"].map(String::from).to_vec(),
            rewrite_line: Vec::new(),
            script: None,
            lines: Lines::default(),
        }
    }
}

impl Rules {
    /// The name of the first skip filter `f` matches.
    pub fn skip(&self, f: &CallFacts) -> Option<&str> {
        self.skip
            .iter()
            .find(|r| r.matches(f))
            .map(|r| r.name.as_str())
    }

    /// The name of the first task filter `f` matches.
    pub fn skip_task(&self, f: &CallFacts) -> Option<&str> {
        self.skip_task
            .iter()
            .find(|r| r.matches(f))
            .map(|r| r.name.as_str())
    }

    /// The calendar of a call: its group's, else the portal's.
    pub fn hours_for(&self, f: &CallFacts) -> Option<&Hours> {
        f.group
            .as_ref()
            .and_then(|g| self.hours_by_group.get(&g.trim().to_lowercase()))
            .or(self.hours.as_ref())
    }

    /// Whether `crm_order` puts the types in the order Bitrix24 itself binds a call to (a
    /// contact, then a company, then a lead): then `register` may choose, and no lookup is
    /// needed to name the entity.
    pub fn crm_order_is_bitrix24s(&self) -> bool {
        let mut ranked: Vec<&str> = ["CONTACT", "COMPANY", "LEAD"].into();
        ranked.sort_by_key(|k| self.crm_rank(k));
        ranked == ["CONTACT", "COMPANY", "LEAD"]
    }

    /// Where an entity type comes in `crm_order` (unlisted types last).
    pub fn crm_rank(&self, kind: &str) -> usize {
        self.crm_order
            .iter()
            .position(|k| k.eq_ignore_ascii_case(kind))
            .unwrap_or(self.crm_order.len())
    }

    /// The operator's inner line after the line rewrites (the first that matches applies).
    pub fn rewrite_inner(&self, line: &str) -> String {
        let line = line.trim();
        for r in &self.rewrite_line {
            if r.pattern.is_match(line) {
                return r.pattern.replace(line, r.replace.as_str()).into_owned();
            }
        }
        line.to_string()
    }

    /// The client number after the rewrite rules (the first one that matches applies).
    pub fn rewrite_client(&self, raw: &str) -> String {
        let raw = raw.trim();
        for r in &self.rewrite {
            if r.pattern.is_match(raw) {
                return r.pattern.replace(raw, r.replace.as_str()).into_owned();
            }
        }
        raw.to_string()
    }
}

/// The values templates can use for a call.
pub fn values(
    f: &CallFacts,
    tz: Tz,
    operator: Option<&str>,
    crm_link: Option<String>,
) -> BTreeMap<&'static str, String> {
    let mut v = BTreeMap::new();
    v.insert("client", f.client_number.clone());
    v.insert(
        "direction",
        if f.way == Way::In {
            "incoming"
        } else {
            "outgoing"
        }
        .into(),
    );
    v.insert("state", f.state.as_str().to_string());
    v.insert("operator_name", operator.unwrap_or("").to_string());
    v.insert("line", f.operator_line.clone().unwrap_or_default());
    v.insert("outer", f.outer.clone().unwrap_or_default());
    v.insert("group", f.group.clone().unwrap_or_default());
    v.insert("talk", f.seconds_talk.to_string());
    v.insert("duration", f.seconds_full.to_string());
    v.insert(
        "started_local",
        f.started_at
            .with_timezone(&tz)
            .format("%Y-%m-%d %H:%M")
            .to_string(),
    );
    v.insert("call_id", f.id.clone());
    v.insert("recording", f.link.clone().unwrap_or_default());
    v.insert("crm_link", crm_link.unwrap_or_default());
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unitalk::CallState;
    use chrono::TimeZone;

    fn call(number: &str, way: Way, state: CallState, talk: u32) -> CallFacts {
        CallFacts {
            id: "1".into(),
            external_id: "unitalk-1".into(),
            way,
            client_number: number.into(),
            operator_line: Some("101".into()),
            started_at: chrono::Utc
                .with_ymd_and_hms(2026, 11, 24, 10, 0, 0)
                .unwrap(),
            seconds_talk: talk,
            seconds_full: talk + 5,
            status_code: "200",
            missed: false,
            state,
            link: None,
            line_number: Some("380443334455".into()),
            outer: Some("380443334455".into()),
            group: Some("Sales".into()),
        }
    }

    fn set(entries: &[&str]) -> NumberSet {
        let mut s = NumberSet::default();
        for e in entries {
            s.add(e).unwrap();
        }
        s
    }

    #[test]
    fn number_sets_match_exact_digits_prefixes_and_expressions() {
        let s = set(&["+380 50 111-22-33", "prefix:+7", r"regex:^\+3809[3-9]"]);
        assert!(s.contains("+380501112233"));
        assert!(s.contains("+79001234567"));
        assert!(s.contains("+380931234567"));
        assert!(!s.contains("+380671234567"));
        assert!(NumberSet::default().add("anonymous").is_err());
        assert!(NumberSet::default().add("regex:([").is_err());
    }

    #[test]
    fn filters_combine_with_all_or_any() {
        let conds = vec![
            Cond::Direction(vec![Way::In]),
            Cond::TalkBelow(5),
            Cond::Group(vec!["sales".into()]),
        ];
        let all = Filter {
            name: "all".into(),
            any: false,
            conds: conds.clone(),
        };
        let any = Filter {
            name: "any".into(),
            any: true,
            conds,
        };
        let short_in = call("+380501112233", Way::In, CallState::Answer, 2);
        let long_out = call("+380501112233", Way::Out, CallState::Answer, 60);
        assert!(all.matches(&short_in));
        assert!(!all.matches(&long_out));
        assert!(any.matches(&long_out), "the group matches");
        let mut no_group = long_out.clone();
        no_group.group = None;
        assert!(!any.matches(&no_group));
        let rules = Rules {
            skip: vec![all.clone()],
            skip_task: vec![any.clone()],
            ..Rules::default()
        };
        assert_eq!(rules.skip(&short_in), Some("all"));
        assert_eq!(rules.skip(&long_out), None);
        assert_eq!(rules.skip_task(&long_out), Some("any"));
    }

    #[test]
    fn conditions_on_lines_states_and_clients() {
        let c = call("+380501112233", Way::In, CallState::NoAnswer, 0);
        assert!(Cond::InnerLine(vec!["101".into()]).holds(&c));
        assert!(!Cond::InnerLine(vec!["102".into()]).holds(&c));
        assert!(Cond::State(vec!["NOANSWER".into()]).holds(&c));
        assert!(Cond::OuterLine(set(&["+380 44 333 44 55"])).holds(&c));
        assert!(Cond::Client(set(&["prefix:38050"])).holds(&c));
        let mut site = c.clone();
        site.outer = Some("Site.UA".into());
        let mut by_name = NumberSet::default();
        by_name.exact.insert("site.ua".into());
        assert!(Cond::OuterLine(by_name).holds(&site));
    }

    #[test]
    fn the_responsible_is_the_first_source_of_the_order_with_a_user() {
        let f = call("+380501112233", Way::In, CallState::NoAnswer, 0);
        let mut r = Responsible::default();
        r.lines.insert("380443334455".into(), 12);
        r.groups.insert("sales".into(), 15);
        assert_eq!(r.pick(&f, Some(7), Some(10), Some(1)), Some(7), "crm first");
        assert_eq!(r.pick(&f, None, Some(10), Some(1)), Some(10));
        assert_eq!(
            r.pick(&f, None, None, Some(1)),
            Some(12),
            "the company line's user"
        );
        r.lines.clear();
        assert_eq!(
            r.pick(&f, None, None, Some(1)),
            Some(15),
            "the group's user"
        );
        r.groups.clear();
        assert_eq!(r.pick(&f, None, None, Some(1)), Some(1));
        assert_eq!(
            r.pick(&f, None, None, None),
            None,
            "nobody: the call waits or is quarantined"
        );
        r.order = vec![Who::Default, Who::Operator];
        assert_eq!(r.pick(&f, Some(7), Some(10), Some(1)), Some(1));
    }

    #[test]
    fn lead_creation_follows_the_direction_policy() {
        assert!(LeadsFor::All.allows(Way::In) && LeadsFor::All.allows(Way::Out));
        assert!(LeadsFor::Incoming.allows(Way::In) && !LeadsFor::Incoming.allows(Way::Out));
        assert!(!LeadsFor::Outgoing.allows(Way::In) && LeadsFor::Outgoing.allows(Way::Out));
        assert!(!LeadsFor::None.allows(Way::In) && !LeadsFor::None.allows(Way::Out));
    }

    #[test]
    fn the_first_matching_rewrite_applies() {
        let rules = Rules {
            rewrite: vec![
                Rewrite {
                    pattern: Regex::new(r"^8(0\d{9})$").unwrap(),
                    replace: "+38$1".into(),
                },
                Rewrite {
                    pattern: Regex::new(r"^9(\d+)$").unwrap(),
                    replace: "$1".into(),
                },
            ],
            ..Rules::default()
        };
        assert_eq!(rules.rewrite_client("80501112233"), "+380501112233");
        assert_eq!(rules.rewrite_client("90501112233"), "0501112233");
        assert_eq!(rules.rewrite_client("+380501112233"), "+380501112233");
    }
}
