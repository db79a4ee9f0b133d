"""One instance. This package holds the parts that run in the controller's process: the
step loop (`instance`), the handles that reach a worker (`executor`), the driving of KV
transfers between two workers (`transport`), turning step outputs into text (`outputs`,
`detokenizer`) and the step trace; and the offline engine (`engine`: scheduler and
worker in one process). What runs inside a worker's own process (a Ray actor, or this
process for the offline engine and tests) is the `worker` subpackage, which imports
nothing from the rest of this package."""
