//! `slotq keyslot KEY...`

/// Prints `KEY<TAB>SLOT` per key, or a JSON array.
pub fn run(keys: &[String], as_json: bool) -> String {
    if as_json {
        let items: Vec<crate::json::KeySlot<'_>> = keys
            .iter()
            .map(|k| crate::json::KeySlot {
                key: k,
                slot: slotq::slot::key_slot(k),
            })
            .collect();
        crate::json::line(&items)
    } else {
        keys.iter()
            .map(|k| format!("{k}\t{}\n", slotq::slot::key_slot(k)))
            .collect()
    }
}
