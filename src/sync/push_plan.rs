//! A push round's decisions as one value, made before anything is sent: the chains each call
//! still needs (with the ledger row it is sent with), and the calls quarantined instead (no
//! Bitrix24 user can take them, the rules script refused them). Planning is pure (config, due
//! work, lookups → `PushPlan`); `execute.rs` sends it; a dry run prints it.

use std::collections::HashMap;

use super::call::CallFacts;
use super::gather::{no_user_reason, user_for};
use super::plan::{self, CallPlan, Entity, Portal};
use super::Due;
use crate::bitrix24::api;
use crate::bitrix24::batch::Command;
use crate::config::Config;
use crate::store::ledger::WorkItem;
use crate::store::ledger::{LedgerRow, NewQuarantine, Stage};

/// One call's commands and the ledger row it is sent with.
#[derive(Debug, Clone)]
pub(super) struct Chain {
    pub plan: CallPlan,
    pub row: LedgerRow,
    /// The chain holds a command that must never run twice (all but `attachRecord`), so an
    /// unknown outcome is probed before anything is sent again.
    pub non_idempotent: bool,
}

/// What a push round will do.
#[derive(Debug, Default)]
pub(super) struct PushPlan {
    pub chains: Vec<Chain>,
    /// Each planned call's facts and content hash (to record its outcome).
    pub facts: HashMap<String, (CallFacts, String)>,
    pub quarantines: Vec<(LedgerRow, NewQuarantine)>,
    /// Calls that need nothing in Bitrix24, with the row that says why (`skipped`).
    pub skips: Vec<LedgerRow>,
}

impl PushPlan {
    /// A call no Bitrix24 user can take: quarantined with the reason.
    pub fn refuse_no_user(&mut self, d: &Due) {
        self.quarantines.push(quarantine_item(
            &d.item,
            "bitrix24",
            no_user_reason(&d.facts),
        ));
    }

    /// A call the rules script refused: quarantined with the script's message.
    pub fn refuse_script(&mut self, d: &Due, reason: String) {
        self.quarantines
            .push(quarantine_item(&d.item, "unitalk", reason));
    }

    /// Adds a call's chain.
    pub fn add(&mut self, d: &Due, commands: Vec<Command>, row: LedgerRow) {
        let non_idempotent = commands
            .iter()
            .any(|c| c.method != "telephony.externalCall.attachRecord");
        self.facts.insert(
            d.facts.id.clone(),
            (d.facts.clone(), d.item.content_hash.clone()),
        );
        self.chains.push(Chain {
            plan: CallPlan {
                call_id: d.facts.id.clone(),
                commands,
            },
            row,
            non_idempotent,
        });
    }

    /// Every planned command, one line each, call by call (a dry run's listing; the
    /// quarantines are listed where they are settled).
    pub fn describe(&self) -> Vec<String> {
        self.chains
            .iter()
            .flat_map(|c| super::execute::describe_plan(&c.plan))
            .collect()
    }

    /// How many commands and batch requests the chains take.
    pub fn size(&self) -> (usize, usize) {
        let commands = self.chains.iter().map(|c| c.plan.commands.len()).sum();
        let batches = plan::pack(self.chains.iter().map(|c| c.plan.clone()).collect()).len();
        (commands, batches)
    }
}

/// Telephony mode's plan for the due calls: register → finish (→ attachRecord) for new calls,
/// what is left for the others; a call with nothing to send is left out.
pub(super) fn plan_telephony(
    cfg: &Config,
    due: Vec<Due>,
    users: &HashMap<String, i64>,
    entities: &HashMap<String, Entity>,
    portal: Portal,
) -> PushPlan {
    let mut out = PushPlan::default();
    for d in due {
        let l = &d.item.ledger;
        if l.stage == Stage::Finished && !plan::needs_recording(&d.facts, l) {
            continue;
        }
        let Some(user) = user_for(cfg, &d.facts, users) else {
            out.refuse_no_user(&d);
            continue;
        };
        let entity = entities.get(&d.facts.client_number);
        let commands = plan::telephony_chain(cfg, &d.facts, l, user, entity, portal);
        if commands.is_empty() {
            continue;
        }
        match scripted(cfg, &d.facts, &d.item.raw, commands) {
            Ok(commands) => {
                let mut row = l.clone();
                row.responsible_id = Some(user);
                if let Some(e) = entity.filter(|_| l.stage == Stage::Pending) {
                    row.crm_entity_type = Some(e.kind.clone());
                    row.crm_entity_id = Some(e.id);
                }
                out.add(&d, commands, row);
            }
            Err(e) => out.refuse_script(&d, e),
        }
    }
    out
}

/// Quarantines a call with work due: its next ledger row and its quarantine entry.
pub(super) fn quarantine_item(
    item: &WorkItem,
    source: &'static str,
    reason: String,
) -> (LedgerRow, NewQuarantine) {
    let mut l = item.ledger.clone();
    l.stage = Stage::Quarantined;
    l.reason = Some(reason.clone());
    let q = NewQuarantine {
        source,
        call_id: Some(l.call_id.clone()),
        raw: item.raw.clone(),
        reason,
    };
    (l, q)
}

/// Runs `rules.script` over a call's planned commands: `register`, `finish` (their parameters),
/// `task`, `activity` (their `fields`). An error is the script's message: the caller
/// quarantines that call.
pub(super) fn scripted(
    cfg: &Config,
    f: &CallFacts,
    raw: &str,
    mut commands: Vec<Command>,
) -> Result<Vec<Command>, String> {
    let Some(script) = &cfg.rules.script else {
        return Ok(commands);
    };
    let call = crate::rules::script::call_map(f, serde_json::from_str(raw).ok().as_ref());
    for c in &mut commands {
        let Some((stage, nested)) = api::script_stage(&c.method) else {
            continue;
        };
        if !script.defines(stage) {
            continue;
        }
        let after = script.fields(stage, &call, &api::editable_fields(c, nested))?;
        api::set_editable_fields(c, nested, after);
    }
    Ok(commands)
}

/// Activity mode's plan for new calls, once their clients' CRM entities are known (looked up,
/// or created as leads): one `crm.activity.add` each. A call whose number has no entity waits
/// for its lead, or, when leads are not created for its direction, gets no activity (a missed
/// one still gets its task: `ledger::without_activity`).
pub(super) fn plan_activity(
    cfg: &Config,
    fresh: Vec<Due>,
    entities: &HashMap<String, Entity>,
    users: &HashMap<String, i64>,
) -> PushPlan {
    let mut out = PushPlan::default();
    for d in fresh {
        let Some(entity) = entities.get(&d.facts.client_number) else {
            if !cfg.rules.leads.create.allows(d.facts.way) {
                let why = format!(
                    "no CRM entity has this number and leads are not created for {} calls (rules.leads.create)",
                    if d.facts.way == super::call::Way::In { "incoming" } else { "outgoing" }
                );
                out.skips.push(super::ledger::without_activity(
                    cfg,
                    &d.facts,
                    d.item.ledger.clone(),
                    &d.item.content_hash,
                    why,
                ));
            }
            continue;
        };
        let Some(user) = user_for(cfg, &d.facts, users) else {
            out.refuse_no_user(&d);
            continue;
        };
        let mut row = d.item.ledger.clone();
        row.responsible_id = Some(user);
        row.crm_entity_type = Some(entity.kind.clone());
        row.crm_entity_id = Some(entity.id);
        let command = plan::activity_add(
            cfg,
            &d.facts,
            entity,
            user,
            d.facts.operator_line.as_deref(),
        );
        match scripted(cfg, &d.facts, &d.item.raw, vec![command]) {
            Ok(commands) => out.add(&d, commands, row),
            Err(e) => out.refuse_script(&d, e),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::HashSet;

    const YES: Portal = Portal {
        attach_in_batch: true,
        finish_takes_link: true,
    };

    fn cfg(extra: &str) -> Config {
        Config::parse(
            &format!("[unitalk]\napi_key=\"k\"\n[bitrix24]\nmode=\"telephony\"\nportal_url=\"https://p.bitrix24.ua\"\nclient_id=\"c\"\nclient_secret=\"s\"\n{extra}"),
            std::path::Path::new("/x.toml"),
            &Default::default(),
        )
        .unwrap()
    }

    fn due(id: u64, state: &str, link: Option<&str>, line: &str, stage: Stage) -> Due {
        let mut v = json!({"id": id, "date": "2026-11-22 10:00:00", "direction": "IN", "from": "380501112233", "to": [line], "state": state, "secondsTalk": if state == "ANSWER" { 30 } else { 0 }});
        if let Some(l) = link {
            v["link"] = json!(l);
        }
        let call = crate::unitalk::wire::parse_call(&v, chrono_tz::Europe::Kyiv).unwrap();
        let lines: HashSet<String> = ["101".to_string(), "102".to_string()].into();
        let c = cfg("");
        let facts = match crate::sync::call::classify(&call, &lines, &c.sync, &c.rules) {
            crate::sync::call::Disposition::Push(f) => *f,
            _ => panic!("not pushable"),
        };
        let mut ledger = LedgerRow::pending(&id.to_string());
        ledger.stage = stage;
        if stage != Stage::Pending {
            ledger.b24_call_id = Some(format!("externalCall.{id}"));
        }
        Due {
            item: WorkItem {
                ledger,
                raw: v.to_string(),
                content_hash: "h".into(),
                started_at: facts.started_at,
            },
            facts,
        }
    }

    fn methods(p: &PushPlan, call: &str) -> Vec<String> {
        p.chains
            .iter()
            .filter(|c| c.plan.call_id == call)
            .flat_map(|c| c.plan.commands.iter().map(|c| c.method.clone()))
            .collect()
    }

    /// (a due call → what the plan holds for it)
    #[test]
    fn every_due_call_gets_exactly_the_commands_it_still_needs() {
        let users: HashMap<String, i64> = [("101".to_string(), 5)].into();
        let rec = "https://rec/1.mp3";
        let calls = vec![
            due(1, "ANSWER", Some(rec), "101", Stage::Pending),
            due(2, "NOANSWER", None, "101", Stage::Pending),
            due(3, "ANSWER", Some(rec), "101", Stage::Registered),
            due(4, "ANSWER", Some(rec), "101", Stage::Finished),
            due(5, "ANSWER", None, "101", Stage::Finished),
            // No user for line 102 and no default user: quarantined, nothing sent.
            due(6, "ANSWER", None, "102", Stage::Pending),
        ];
        let p = plan_telephony(&cfg(""), calls, &users, &HashMap::new(), YES);
        let (reg, fin, att) = (
            "telephony.externalCall.register",
            "telephony.externalCall.finish",
            "telephony.externalCall.attachRecord",
        );
        assert_eq!(methods(&p, "1"), vec![reg, fin], "the link goes in finish");
        let finish = &p.chains[0].plan.commands[1];
        assert_eq!(finish.params["RECORD_URL"], json!(rec));
        assert_eq!(finish.params["CALL_ID"], json!("$result[r_1][CALL_ID]"));
        assert_eq!(methods(&p, "2"), vec![reg, fin]);
        assert_eq!(methods(&p, "3"), vec![fin], "never a second register");
        assert_eq!(methods(&p, "4"), vec![att], "a link that came after finish");
        assert!(methods(&p, "5").is_empty(), "nothing left");
        assert!(methods(&p, "6").is_empty());
        assert_eq!(p.quarantines.len(), 1);
        assert_eq!(p.quarantines[0].0.call_id, "6");
        assert_eq!(p.quarantines[0].0.stage, Stage::Quarantined);
        assert!(p.chains.iter().all(|c| c.row.responsible_id == Some(5)));
        let idempotent: Vec<bool> = p.chains.iter().map(|c| c.non_idempotent).collect();
        assert_eq!(idempotent, vec![true, true, true, false]);
        assert_eq!(p.size(), (6, 1));
        let lines = p.describe();
        assert_eq!(lines.len(), 6, "each command once: {lines:#?}");
        assert_eq!(
            lines[0],
            format!("call 1: {}", p.chains[0].plan.commands[0].encode())
        );

        // Without RECORD_URL in finish (configured off, or a portal that showed it does not
        // download it), the recording is a third command of the chain; with attachRecord
        // refused in batches, none goes in the chain at all.
        let one = || vec![due(1, "ANSWER", Some(rec), "101", Stage::Pending)];
        let off = cfg("[sync]\nrecord_url_on_finish = false\n");
        let p = plan_telephony(&off, one(), &users, &HashMap::new(), YES);
        assert_eq!(methods(&p, "1"), vec![reg, fin, att]);
        let ignored = Portal {
            finish_takes_link: false,
            ..YES
        };
        let p = plan_telephony(&cfg(""), one(), &users, &HashMap::new(), ignored);
        assert_eq!(methods(&p, "1"), vec![reg, fin, att]);
        assert!(!p.chains[0].plan.commands[1]
            .params
            .contains_key("RECORD_URL"));
        let refused = Portal {
            attach_in_batch: false,
            ..YES
        };
        let p = plan_telephony(&off, one(), &users, &HashMap::new(), refused);
        assert_eq!(methods(&p, "1"), vec![reg, fin]);
    }

    #[test]
    fn an_activity_is_planned_for_a_known_client_and_an_unknown_one_waits_or_is_skipped() {
        let activity = |create: bool| {
            Config::parse(
                &format!("[unitalk]\napi_key=\"k\"\n[bitrix24]\nmode=\"activity\"\nwebhook_url=\"https://p.bitrix24.ua/rest/1/x/\"\n[activity]\ncreate_leads = {create}\n"),
                std::path::Path::new("/x.toml"),
                &Default::default(),
            )
            .unwrap()
        };
        let users: HashMap<String, i64> = [("101".to_string(), 5)].into();
        let known = due(
            1,
            "ANSWER",
            Some("https://rec/1.mp3"),
            "101",
            Stage::Pending,
        );
        let entities: HashMap<String, Entity> = [(
            known.facts.client_number.clone(),
            Entity {
                kind: "CONTACT".into(),
                id: 797,
            },
        )]
        .into();
        let p = plan_activity(&activity(true), vec![known], &entities, &users);
        assert_eq!(methods(&p, "1"), vec!["crm.activity.add"]);
        let fields = &p.chains[0].plan.commands[0].params["fields"];
        assert_eq!(
            (fields["OWNER_TYPE_ID"].clone(), fields["OWNER_ID"].clone()),
            (json!(3), json!(797))
        );
        assert_eq!(fields["ORIGIN_ID"], json!("unitalk-1"));
        assert_eq!(p.chains[0].row.crm_entity_id, Some(797));
        assert!(
            p.chains[0].non_idempotent,
            "probed by ORIGIN_ID before any resend"
        );

        let unknown = || vec![due(2, "ANSWER", None, "101", Stage::Pending)];
        let p = plan_activity(&activity(true), unknown(), &HashMap::new(), &users);
        assert!(
            p.chains.is_empty() && p.skips.is_empty(),
            "waits for its lead"
        );
        let p = plan_activity(&activity(false), unknown(), &HashMap::new(), &users);
        assert_eq!(p.skips.len(), 1);
        assert_eq!(p.skips[0].stage, Stage::Skipped);
        assert!(p.skips[0]
            .reason
            .as_deref()
            .unwrap()
            .contains("rules.leads.create"));
        // A missed call from an unknown number gets no activity, but its task is still due.
        let missed = vec![due(3, "NOANSWER", None, "101", Stage::Pending)];
        let p = plan_activity(&activity(false), missed, &HashMap::new(), &users);
        let row = &p.skips[0];
        assert_eq!(row.stage, Stage::Finished, "the task round takes it");
        assert!(row.activity_left_out(), "{row:?}");
        assert!(row
            .reason
            .as_deref()
            .unwrap()
            .contains("rules.leads.create"));
        assert_eq!(row.client.as_deref(), Some("+380501112233"));
    }
}
