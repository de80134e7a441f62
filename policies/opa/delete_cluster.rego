# An Airfleet policy in Rego, served by Open Policy Agent (policies/README.md, "OPA").
# Bound with:
#   airfleet policies bind delete_cluster=prod_guard --mode http \
#       --url http://opa:8181/v1/data/airfleet/delete_cluster/decision
# OPA's input is Airfleet's request (action, cluster, input, health, now, run, params).
package airfleet.delete_cluster

import rego.v1

default decision := {"allowed": true, "reason": "not a production cluster"}

decision := {
	"allowed": false,
	"reason": sprintf("cluster %s is labelled env=prod: deleting it needs the label changed first", [input.cluster.name]),
} if input.cluster.labels.env == "prod"

# The same judgement as a plain boolean (bind .../v1/data/airfleet/delete_cluster/allow). A rule
# without a default is undefined when its body fails, and Airfleet denies an undefined document
# saying so: the default makes a failed body read as false.
default allow := false

allow if decision.allowed
