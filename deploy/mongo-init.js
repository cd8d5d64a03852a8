// Runs once, when the mongo container initialises an empty data volume (docker-compose.yml):
// the user the gateway and the projection connect as, allowed the taskmode database only.
db.getSiblingDB("taskmode").createUser({
  user: "taskmode",
  pwd: process.env.TASKMODE_MONGO_PASSWORD,
  roles: [{ role: "readWrite", db: "taskmode" }],
});
