//! `slotq keyslot KEY...`

use serde_json::json;

/// Prints `KEY<TAB>SLOT` per key, or a JSON array.
pub fn run(keys: &[String], as_json: bool) -> String {
    if as_json {
        let items: Vec<_> = keys
            .iter()
            .map(|k| json!({"key": k, "slot": slotq::slot::key_slot(k)}))
            .collect();
        format!("{}\n", serde_json::Value::Array(items))
    } else {
        keys.iter()
            .map(|k| format!("{k}\t{}\n", slotq::slot::key_slot(k)))
            .collect()
    }
}
