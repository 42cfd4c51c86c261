#!/bin/sh
# An example handler for `slotq consume --exec`: the payload arrives on standard input,
# the message's details in the environment. Exit 0 acknowledges the message; anything
# else has it delivered again after a backoff (at-least-once queues).
payload=$(cat)
echo "queue=$SLOTQ_QUEUE shard=$SLOTQ_SHARD id=$SLOTQ_MESSAGE_ID attempt=$SLOTQ_ATTEMPT bytes=${#payload}"
