//! The batches a statement sends and its aggregates' results count against its memory.
//!
//! # Design
//! DataFusion's operators reserve what they buffer (a sort's input, an aggregate's
//! state), not the batches they hand on. Those are usually small, but an aggregate's
//! result can be one huge value (`string_agg` over a large table), and the batch the
//! endpoint is encoding is held until its last row is sent. A [`CountHeld`] rule, run
//! after DataFusion's own, puts a [`HeldBatchesExec`] above the plan's root and above every
//! aggregate: it reserves the size of the batch that last passed through it from the
//! statement's pool (`super::budget`), so a statement whose results would pass its limit
//! fails with `53200` instead of growing unseen.

use std::sync::Arc;

use deltalake::datafusion::common::Result;
use deltalake::datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use deltalake::datafusion::config::ConfigOptions;
use deltalake::datafusion::execution::memory_pool::MemoryConsumer;
use deltalake::datafusion::execution::{SendableRecordBatchStream, TaskContext};
use deltalake::datafusion::physical_expr::PhysicalExpr;
use deltalake::datafusion::physical_optimizer::PhysicalOptimizerRule;
use deltalake::datafusion::physical_plan::aggregates::AggregateExec;
use deltalake::datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use deltalake::datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties,
};
use futures::StreamExt;

/// Reserves, from the statement's pool, the size of the last batch it passed on.
#[derive(Debug)]
pub struct HeldBatchesExec {
    input: Arc<dyn ExecutionPlan>,
    properties: Arc<PlanProperties>,
}

impl HeldBatchesExec {
    pub fn new(input: Arc<dyn ExecutionPlan>) -> HeldBatchesExec {
        HeldBatchesExec {
            properties: input.properties().clone(),
            input,
        }
    }
}

impl DisplayAs for HeldBatchesExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HeldBatchesExec")
    }
}

impl ExecutionPlan for HeldBatchesExec {
    fn name(&self) -> &str {
        "HeldBatchesExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![true]
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if children.len() != 1 {
            return Err(deltalake::datafusion::common::DataFusionError::Internal(
                "HeldBatchesExec has one child".into(),
            ));
        }
        Ok(Arc::new(HeldBatchesExec::new(children.swap_remove(0))))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let input = self.input.execute(partition, context.clone())?;
        let what = format!("batches of {}[{partition}]", self.input.name());
        let held = MemoryConsumer::new(what).register(context.memory_pool());
        let schema = input.schema();
        let counted = input.map(move |batch| {
            let batch = batch?;
            held.try_resize(batch.get_array_memory_size())?;
            Ok(batch)
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, counted)))
    }
}

/// Whether `plan`'s batches are already counted: it is a [`HeldBatchesExec`], or only
/// passes on (projects, limits, merges) the batches of one.
fn held_below(plan: &Arc<dyn ExecutionPlan>) -> bool {
    const PASS_ON: &[&str] = &[
        "ProjectionExec",
        "CoalescePartitionsExec",
        "CoalesceBatchesExec",
        "GlobalLimitExec",
        "LocalLimitExec",
        "CooperativeExec",
    ];
    let mut node = plan.clone();
    loop {
        if node.is::<HeldBatchesExec>() {
            return true;
        }
        let children = node.children();
        if children.len() != 1 || !PASS_ON.contains(&node.name()) {
            return false;
        }
        let child = children[0].clone();
        node = child;
    }
}

/// Puts a [`HeldBatchesExec`] above the root and every aggregate.
#[derive(Debug, Default)]
pub struct CountHeld;

impl PhysicalOptimizerRule for CountHeld {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let plan = plan
            .transform_up(|node| {
                if node.is::<AggregateExec>() {
                    let held: Arc<dyn ExecutionPlan> = Arc::new(HeldBatchesExec::new(node));
                    Ok(Transformed::yes(held))
                } else {
                    Ok(Transformed::no(node))
                }
            })?
            .data;
        if held_below(&plan) {
            return Ok(plan);
        }
        Ok(Arc::new(HeldBatchesExec::new(plan)))
    }

    fn name(&self) -> &str {
        "wal2delta_count_held_batches"
    }

    fn schema_check(&self) -> bool {
        true
    }
}
