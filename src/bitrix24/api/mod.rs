//! Typed Bitrix24 methods: each command ubsync sends is built here from named parameters, and
//! each answer it reads is decoded here into a struct, leniently (strings or numbers, `null`,
//! `{}` for empty, absent fields). The pipeline (`sync/`) never spells a Bitrix24 field name.
//!
//! - `telephony.rs`: `telephony.externalCall.*` and `voximplant.statistic.get`;
//! - `tasks.rs`: `tasks.task.*`;
//! - `crm.rs`: CRM entities and call activities (`crm.activity.*`, `crm.duplicate.findbycomm`);
//! - `users.rs`: `user.get` by inner line and `im.notify.personal.add`.

pub mod crm;
pub mod tasks;
pub mod telephony;
pub mod users;

pub use crm::Entity;
