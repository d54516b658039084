#!/bin/sh
# Users and permissions for qmpnet on RabbitMQ (default virtual host, the MQTT plugin's amq.topic exchange).
#   sh permissions.sh CONTROLLER_ID ORCHESTRATOR [VIEWER]      e.g.  sh permissions.sh hv01 orchestrator viewer
# Asks each user's password on stdin (rabbitmqctl add_user). Run it once per controller id for more controllers.
#
# RabbitMQ maps an MQTT topic onto a routing key: '/' becomes '.', so qmpnet/hv01/status is qmpnet.hv01.status (and
# a '.' inside a level would become a level of its own: that is why qmpnet names have none). Topic permissions are
# regular expressions on those routing keys; the MQTT plugin's queues are named mqtt-subscription-<client id>qos0|1.
set -eu
controller=$1
orchestrator=$2
viewer=${3:-}
ctl=${RABBITMQCTL:-rabbitmqctl}

# rabbitmqctl must not read stdin: that is where the passwords come from.
add() { pw=$(printf '%s' "password for $1: " >&2; read -r pw; printf '%s' "$pw"); "$ctl" add_user "$1" "$pw" </dev/null; }
rmq() { "$ctl" "$@" </dev/null; }

# The controller (client id qmpnet-<id>): its own session queues, and writes only under qmpnet/<id>/ -- its state,
# events, answers, and the deletion of retained requests on its request topics (docs/mqtt-api.md).
add "$controller"
rmq set_permissions -p / "$controller" "^mqtt-subscription-qmpnet-$controller" \
    "^(amq\.topic|mqtt-subscription-qmpnet-$controller.*)\$" "^(amq\.topic|mqtt-subscription-qmpnet-$controller.*)\$"
rmq set_topic_permissions -p / "$controller" amq.topic "^qmpnet\.$controller\." "^qmpnet\.$controller\."

# The orchestrator: publishes requests (never retained) and desired sets (retained by design) to every
# controller, reads everything under qmpnet/.
add "$orchestrator"
rmq set_permissions -p / "$orchestrator" "^mqtt-subscription-" \
    "^(amq\.topic|mqtt-subscription-.*)\$" "^(amq\.topic|mqtt-subscription-.*)\$"
rmq set_topic_permissions -p / "$orchestrator" amq.topic \
    '^qmpnet\.[^.]+\.(request\..+|guest\.[^.]+\.(request\..+|desired))$' '^qmpnet\.'

# A read-only dashboard.
if [ -n "$viewer" ]; then
    add "$viewer"
    rmq set_permissions -p / "$viewer" "^mqtt-subscription-" \
        "^(amq\.topic|mqtt-subscription-.*)\$" "^(amq\.topic|mqtt-subscription-.*)\$"
    rmq set_topic_permissions -p / "$viewer" amq.topic '^$' '^qmpnet\.'
fi
