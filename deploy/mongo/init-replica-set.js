// Run once by docker-compose.yml's mongo-init service and deploy/k8s's mongo-init Job
// (mongosh --host <first member> --file ...): makes the members the replica set "taskmode", then
// waits until it has a primary. Running it again on an initiated set changes nothing.
// TASKMODE_MONGO_MEMBERS: host:port,host:port,host:port
const members = (process.env.TASKMODE_MONGO_MEMBERS || "mongo-1:27017,mongo-2:27017,mongo-3:27017").split(",");

let initiated = true;
try {
  rs.status();
} catch (err) {
  if (err.codeName !== "NotYetInitialized") throw err;
  initiated = false;
}
if (!initiated) {
  rs.initiate({ _id: "taskmode", members: members.map((host, i) => ({ _id: i, host })) });
  print("replica set taskmode initiated with " + members.join(", "));
}

const deadline = Date.now() + 120 * 1000;
while (!db.hello().primary) {
  if (Date.now() > deadline) throw new Error("replica set taskmode elected no primary within 120 s");
  sleep(1000);
}
print("replica set taskmode has primary " + db.hello().primary);
