from projections.targets.postgres import PostgresTarget as PostgresTarget
from projections.targets.postgres import SqlProjection as SqlProjection
from projections.targets.redis import RedisProjection as RedisProjection
from projections.targets.redis import RedisTarget as RedisTarget
from projections.targets.redis_writes import RedisWrites as RedisWrites
from projections.targets.sql_writes import SqlWrites as SqlWrites
