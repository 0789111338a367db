//! Plans of a session's prepared statements, kept while the view they were made on is
//! the one the session reads.
//!
//! # Design
//! - **Why.** A prepared statement is planned again at every execution, on the current
//!   view, so that it sees new data and the user's current grants. Executed many times
//!   between two lake positions (a dashboard, a driver's point lookups), it was planned
//!   again each time for nothing: parsing and logical planning were a large part of a
//!   1-ms lookup.
//! - **When a plan is reused.** Only on the same view (a new lake position or
//!   `wal2delta.as_of` gives a new one, which empties the cache), for the same SQL text,
//!   parameter types and time zone (which planning folds into timestamp casts). The user
//!   is the session's own.
//! - **What is not kept.** Plans that call a function guarded against output growth
//!   (`growth`): the guard is bound to the memory pool of the statement that planned it,
//!   and each execution has its own pool.
//! - **Bounded.** At most [`MOST`] plans per session; past that the cache starts over.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use super::session::DfStatement;
use super::view::View;

/// Plans kept per session at most.
const MOST: usize = 64;

/// What a plan was made for besides the view: SQL text, parameter types (as text), time
/// zone.
pub type PlanKey = (String, String, Option<String>);

#[derive(Default)]
pub struct PlanCache {
    /// The view the plans were made on (a `Weak` keeps its allocation, so a later view
    /// can never compare equal to it).
    view: Weak<View>,
    plans: HashMap<PlanKey, DfStatement>,
}

impl PlanCache {
    /// The plan made for `key` on `view`, if kept.
    pub fn get(&mut self, view: &Arc<View>, key: &PlanKey) -> Option<DfStatement> {
        self.on(view);
        self.plans.get(key).cloned()
    }

    /// Forgets the plans of any other view.
    fn on(&mut self, view: &Arc<View>) {
        if !Weak::ptr_eq(&self.view, &Arc::downgrade(view)) {
            self.view = Arc::downgrade(view);
            self.plans.clear();
        }
    }

    /// Keeps `plan`, made for `key` on `view`, unless it calls a guarded function.
    pub fn put(&mut self, view: &Arc<View>, key: PlanKey, plan: &DfStatement) {
        let Some((_, logical)) = &plan.1 else {
            return;
        };
        if super::growth::calls_guarded(logical) {
            return;
        }
        self.on(view);
        if self.plans.len() >= MOST {
            self.plans.clear();
        }
        self.plans.insert(key, plan.clone());
    }
}
