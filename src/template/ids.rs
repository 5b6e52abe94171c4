//! Template ids: unique across daemon runs, so a pool that outlived a restart cannot
//! hit the wrong template with an id from before it.

/// The id of the first template of this run: the time in microseconds since the Unix
/// epoch. Ids count up from there, one per template, so a later run starts above every id
/// an earlier one handed out (unless it made more than a million templates a second, or
/// the clock went back), and a pool that outlived a restart cannot hit the wrong template.
pub(crate) fn first_template_id() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 2))
        .unwrap_or(1)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::template::store::{Held, TemplateBudget, TemplateStore};
    use std::time::Duration;

    #[test]
    fn a_later_run_starts_above_every_id_of_an_earlier_one() {
        let grace = Duration::from_secs(10);
        let budget = TemplateBudget {
            templates: 1,
            bytes: 1,
        };
        let prev = bitcoin::hashes::Hash::from_byte_array([0; 32]);
        let group = crate::template::api::Constraints {
            max_additional_size: 0,
            max_additional_sigops: 0,
        };
        let held = || Held::new("t", group, prev, Vec::new());
        let mut earlier = TemplateStore::new(grace, first_template_id(), budget);
        let mut last = 0;
        for _ in 0..1000 {
            last = earlier.insert(held());
        }
        std::thread::sleep(Duration::from_millis(2));
        let later = TemplateStore::<&str>::new(grace, first_template_id(), budget);
        assert!(later.next_id() > last, "{} <= {last}", later.next_id());
    }
}
