//! Which experiment knobs the coordinator of this build can be told about. Participation
//! (sampling a share of the plants each round) and the aggregation strategy are settings of
//! `coordinator.toml` that not every build has; rather than guess, this module asks the
//! coordinator's own config reader (which refuses unknown keys) whether it accepts each
//! candidate key with the experiment's value, and says where to write it. A knob left at its
//! default (participation 1, strategy `fedavg`) needs no support: that is what every
//! coordinator does.

use std::path::Path;

use fedinspect_coordinator::config::{Config, RawConfig};
use toml::Value;

use crate::experiment::Settings;

/// Where a knob goes in `coordinator.toml`: `[table] key = value`.
#[derive(Clone, Debug, PartialEq)]
pub struct ConfigEntry {
    pub table: &'static str,
    pub key: &'static str,
    pub value: Value,
}

/// Candidate places of the share of plants sampled per round.
const PARTICIPATION_KEYS: [(&str, &str); 2] =
    [("round", "sample_fraction"), ("rounds", "sample_fraction")];
/// Candidate places of the aggregation strategy's name.
const STRATEGY_KEYS: [(&str, &str); 2] = [("aggregation", "strategy"), ("round", "strategy")];
/// Where FedAvg's server learning rate goes.
const SERVER_LR_KEYS: [(&str, &str); 1] = [("aggregation", "server_learning_rate")];
/// Where FedAvg's server momentum goes.
const SERVER_MOMENTUM_KEYS: [(&str, &str); 1] = [("aggregation", "server_momentum")];

/// The extra `coordinator.toml` entries `settings` needs, or every knob the coordinator
/// cannot take, each named with what is missing.
pub fn coordinator_entries(settings: &Settings) -> Result<Vec<ConfigEntry>, Vec<String>> {
    let f = &settings.federation;
    let mut entries = Vec::new();
    let mut problems = Vec::new();
    if f.participation < 1.0 {
        match find(&PARTICIPATION_KEYS, Value::Float(f.participation)) {
            Ok(e) => entries.push(e),
            Err(why) => problems.push(format!(
                "federation.participation = {}: {why}; this coordinator has no per-round plant sampling ([round] sample_fraction), so only participation = 1 can run",
                f.participation
            )),
        }
    }
    if f.strategy != "fedavg" {
        match find(&STRATEGY_KEYS, Value::String(f.strategy.clone())) {
            Ok(e) => entries.push(e),
            Err(why) => problems.push(format!(
                "federation.strategy = \"{}\": {why}; this coordinator has no strategy setting ([aggregation] strategy), so only \"fedavg\" can run",
                f.strategy
            )),
        }
    }
    if f.server_learning_rate != 1.0 {
        match find(&SERVER_LR_KEYS, Value::Float(f.server_learning_rate)) {
            Ok(e) => entries.push(e),
            Err(why) => problems.push(format!(
                "federation.server_learning_rate = {}: {why}; this coordinator has no server learning rate ([aggregation] server_learning_rate), so only 1 can run",
                f.server_learning_rate
            )),
        }
    }
    if f.server_momentum != 0.0 {
        match find(&SERVER_MOMENTUM_KEYS, Value::Float(f.server_momentum)) {
            Ok(e) => entries.push(e),
            Err(why) => problems.push(format!(
                "federation.server_momentum = {}: {why}; this coordinator has no server momentum ([aggregation] server_momentum), so only 0 can run",
                f.server_momentum
            )),
        }
    }
    if problems.is_empty() {
        Ok(entries)
    } else {
        Err(problems)
    }
}

/// The first candidate the coordinator's config reader and validation accept with `value`;
/// else why not (the coordinator's own message when the key exists but the value is refused).
fn find(candidates: &[(&'static str, &'static str)], value: Value) -> Result<ConfigEntry, String> {
    let mut refusal = None;
    for &(table, key) in candidates {
        let doc = format!("[{table}]\n{key} = {value}\n");
        match toml::from_str::<RawConfig>(&doc) {
            Ok(raw) => {
                // The reader knows the key; its validation may still refuse the value (the
                // other problems, of files this probe does not name, are not about it).
                let name = format!("{table}.{key}");
                let refused = Config::from_raw(raw, Path::new("/nonexistent"))
                    .err()
                    .and_then(|ps| ps.into_iter().find(|p| p.contains(&name)));
                match refused {
                    None => return Ok(ConfigEntry { table, key, value }),
                    Some(p) => refusal = Some(format!("the coordinator refuses it: {p}")),
                }
            }
            Err(e) => {
                let message = e.to_string();
                if !message.contains("unknown field") {
                    refusal = Some(format!(
                        "coordinator.toml [{table}] {key} refuses it: {}",
                        message.trim()
                    ));
                }
            }
        }
    }
    Err(refusal.unwrap_or_else(|| "not supported by the coordinator of this build".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_not_accepted_by_the_coordinator_reader() {
        // The probe relies on the reader refusing keys it does not know.
        let e = find(&[("round", "no_such_knob_for_sure")], Value::Float(0.5)).unwrap_err();
        assert!(e.contains("not supported"), "{e}");
    }

    #[test]
    fn a_known_key_is_found_where_the_coordinator_reads_it() {
        let e = find(
            &[("rounds", "fedprox_mu"), ("round", "fedprox_mu")],
            Value::Float(0.1),
        )
        .unwrap();
        assert_eq!((e.table, e.key), ("round", "fedprox_mu"));
    }

    #[test]
    fn server_momentum_goes_to_the_coordinators_aggregation_table() {
        let exp = crate::experiment::Experiment::parse(
            "[federation]\nserver_momentum = 0.5\nserver_learning_rate = 0.5\n",
            "t",
            None,
        )
        .unwrap();
        let entries = coordinator_entries(&exp.base).unwrap();
        let keys: Vec<_> = entries.iter().map(|e| (e.table, e.key)).collect();
        assert_eq!(
            keys,
            [
                ("aggregation", "server_learning_rate"),
                ("aggregation", "server_momentum")
            ]
        );
        assert_eq!(
            exp.base.federation.strategy_label(),
            "fedavg(server_lr=0.5,momentum=0.5)"
        );
        let e = match crate::experiment::Experiment::parse(
            "[federation]\nserver_momentum = 1.5\n",
            "t",
            None,
        ) {
            Err(e) => format!("{e:?}"),
            Ok(_) => panic!("momentum 1.5 accepted"),
        };
        assert!(e.contains("server momentum 1.5 must be"), "{e}");
    }
}
