"""The plumbing every layer stands on: the collectives of a distributed run
(:mod:`.distributed`), the progress of long runs (:mod:`.progress`), the rules of every file the
package writes (:mod:`.files`: one writer, atomic outputs, no output over an input) and typed
option fields (:mod:`.fields`)."""
